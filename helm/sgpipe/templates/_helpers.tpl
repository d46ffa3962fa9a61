{{/*
Names and labels. Selectors use only name, instance and component: never the chart version,
so an upgrade does not orphan pods.
*/}}
{{- define "sgpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name, at most 52 characters so "-processor-metrics" style suffixes
and the ReplicaSet/pod hash still fit Kubernetes' 63-character names. */}}
{{- define "sgpipe.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sgpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sgpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sgpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sgpipe.labels" -}}
helm.sh/chart: {{ include "sgpipe.chart" . }}
{{ include "sgpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sgpipe
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one stage: call with (dict "root" $ "component" "ingest"). */}}
{{- define "sgpipe.componentLabels" -}}
{{ include "sgpipe.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sgpipe.componentSelectorLabels" -}}
{{ include "sgpipe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sgpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sgpipe.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sgpipe.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
sgpipe settings the templates need, with sgpipe's own defaults when the config leaves them out
(tests/chart/test_chart_config.py checks these defaults against sgpipe/runtime/settings.py).
*/}}
{{- define "sgpipe.ingestPort" -}}
{{- $ingest := default dict .Values.config.ingest }}
{{- default 8080 $ingest.port }}
{{- end }}

{{- define "sgpipe.healthPort" -}}
{{- $stage := default dict (index .root.Values.config .stage) }}
{{- default (ternary 8081 8082 (eq .stage "processor")) $stage.health_port }}
{{- end }}

{{- define "sgpipe.partitions" -}}
{{- $kafka := default dict .Values.config.kafka }}
{{- $topics := default dict $kafka.topics }}
{{- default 6 $topics.partitions }}
{{- end }}

{{- define "sgpipe.stopTimeoutSeconds" -}}
{{- $stage := default dict (index .root.Values.config .stage) }}
{{- default 60 $stage.stop_timeout_seconds }}
{{- end }}

{{- define "sgpipe.groupId" -}}
{{- $stage := default dict (index .root.Values.config .stage) }}
{{- default (printf "sgpipe-%s" .stage) $stage.group_id }}
{{- end }}

{{/* The topic a consuming stage reads: the processor reads raw batches, the sink events. */}}
{{- define "sgpipe.sourceTopic" -}}
{{- $kafka := default dict .root.Values.config.kafka }}
{{- $topics := default dict $kafka.topics }}
{{- if eq .stage "processor" }}
{{- default "sgpipe.raw" $topics.raw }}
{{- else }}
{{- default "sgpipe.events" $topics.events }}
{{- end }}
{{- end }}

{{/* SGPIPE_WEBHOOKS__<NAME>__...: sgpipe maps "_" back to "-" when it looks a webhook up. */}}
{{- define "sgpipe.webhookEnvName" -}}
{{- printf "SGPIPE_WEBHOOKS__%s__%s" (.name | upper | replace "-" "_") .field }}
{{- end }}

{{- define "sgpipe.kafkaCaPath" -}}
{{- printf "/etc/sgpipe/kafka-ca/%s" .Values.secrets.kafkaCa.key }}
{{- end }}

{{/*
The sgpipe.yaml the pods read: .Values.config plus what the chart owns (the webhooks list and
the mounted Kafka CA). Secrets never appear here; they come from Secrets as environment.
*/}}
{{- define "sgpipe.configFile" -}}
{{- $config := deepCopy .Values.config }}
{{- $webhooks := list }}
{{- range .Values.webhooks }}
{{- $webhooks = append $webhooks (merge (dict "name" .name) (deepCopy (default dict .settings))) }}
{{- end }}
{{- $_ := set $config "webhooks" $webhooks }}
{{- if .Values.secrets.kafkaCa.name }}
{{- $kafka := deepCopy (default dict $config.kafka) }}
{{- $_ := set $kafka "ssl_cafile" (include "sgpipe.kafkaCaPath" .) }}
{{- $_ := set $config "kafka" $kafka }}
{{- end }}
{{- $signing := list }}
{{- if .Values.secrets.oauthSigningKey.name }}
{{- $signing = append $signing "/etc/sgpipe/oauth/current.pem" }}
{{- end }}
{{- if .Values.secrets.oauthPreviousSigningKey.name }}
{{- $signing = append $signing "/etc/sgpipe/oauth/previous.pem" }}
{{- end }}
{{- if $signing }}
{{- $ingest := deepCopy (default dict $config.ingest) }}
{{- $_ := set $ingest "oauth_signing_key_files" $signing }}
{{- $_ := set $config "ingest" $ingest }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{- define "sgpipe.secretEnvVar" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name }}
      key: {{ .ref.key }}
{{- end }}

{{/*
Secrets as environment, each stage only the ones it uses: (dict "root" $ "stage" "sink").
*/}}
{{- define "sgpipe.secretEnv" -}}
{{- $root := .root }}
{{- $stage := .stage }}
{{- $secrets := $root.Values.secrets }}
{{- /* `webhooks check` compares SendGrid's keys with the trusted ones: it needs those only. */}}
{{- if has $stage (list "ingest" "webhooks-check") }}
{{- range $root.Values.webhooks }}
{{- if and .publicKeysSecret .publicKeysSecret.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" (include "sgpipe.webhookEnvName" (dict "name" .name "field" "PUBLIC_KEYS")) "ref" .publicKeysSecret) }}
{{- end }}
{{- if and (eq $stage "ingest") .oauthClientsSecret .oauthClientsSecret.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" (include "sgpipe.webhookEnvName" (dict "name" .name "field" "OAUTH_CLIENTS")) "ref" .oauthClientsSecret) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (ne $stage "webhooks-check") $secrets.kafkaSaslUsername.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" "SGPIPE_KAFKA__SASL_USERNAME" "ref" $secrets.kafkaSaslUsername) }}
{{- end }}
{{- if and (ne $stage "webhooks-check") $secrets.kafkaSaslPassword.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" "SGPIPE_KAFKA__SASL_PASSWORD" "ref" $secrets.kafkaSaslPassword) }}
{{- end }}
{{- if and (has $stage (list "sink" "migrate")) $secrets.clickhousePassword.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" "SGPIPE_CLICKHOUSE__PASSWORD" "ref" $secrets.clickhousePassword) }}
{{- end }}
{{- if and (has $stage (list "processor")) $secrets.piiHashKey.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" "SGPIPE_PII__HASH_KEY" "ref" $secrets.piiHashKey) }}
{{- end }}
{{- if and (has $stage (list "ingest" "processor")) $secrets.rawAuthKeys.name }}
{{ include "sgpipe.secretEnvVar" (dict "env" "SGPIPE_RAW_AUTH__KEYS" "ref" $secrets.rawAuthKeys) }}
{{- end }}
{{- end }}

{{/* Volumes every sgpipe pod mounts: the config, /tmp, and the Kafka CA when there is one. */}}
{{- define "sgpipe.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit }}
{{- if .root.Values.secrets.kafkaCa.name }}
- name: kafka-ca
  secret:
    secretName: {{ .root.Values.secrets.kafkaCa.name }}
    items:
      - key: {{ .root.Values.secrets.kafkaCa.key }}
        path: {{ .root.Values.secrets.kafkaCa.key }}
{{- end }}
{{- end }}

{{/* The token endpoint's signing keys, ingress pods only: current.pem signs, both verify. */}}
{{- define "sgpipe.oauthSigningKeyVolume" -}}
{{- $current := .Values.secrets.oauthSigningKey }}
{{- $previous := .Values.secrets.oauthPreviousSigningKey }}
{{- if or $current.name $previous.name }}
- name: oauth-signing-keys
  projected:
    defaultMode: 0400
    sources:
      {{- if $current.name }}
      - secret:
          name: {{ $current.name }}
          items:
            - key: {{ $current.key }}
              path: current.pem
      {{- end }}
      {{- if $previous.name }}
      - secret:
          name: {{ $previous.name }}
          items:
            - key: {{ $previous.key }}
              path: previous.pem
      {{- end }}
{{- end }}
{{- end }}

{{- define "sgpipe.oauthSigningKeyMount" -}}
{{- if or .Values.secrets.oauthSigningKey.name .Values.secrets.oauthPreviousSigningKey.name }}
- name: oauth-signing-keys
  mountPath: /etc/sgpipe/oauth
  readOnly: true
{{- end }}
{{- end }}

{{- define "sgpipe.volumeMounts" -}}
- name: config
  mountPath: /etc/sgpipe/sgpipe.yaml
  subPath: sgpipe.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.secrets.kafkaCa.name }}
- name: kafka-ca
  mountPath: /etc/sgpipe/kafka-ca
  readOnly: true
{{- end }}
{{- end }}

{{/* A probe on an HTTP path of the stage's health port: (dict "path" "/healthz" "probe" $values). */}}
{{- define "sgpipe.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: http
{{ toYaml .probe }}
{{- end }}

{{/*
Default topology spread: across zones and nodes, preferred (ScheduleAnyway) so a small cluster
still schedules every replica. Constraints from values without a labelSelector get the stage's.
*/}}
{{- define "sgpipe.topologySpread" -}}
{{- $selector := dict "matchLabels" (include "sgpipe.componentSelectorLabels" (dict "root" .root "component" .component) | fromYaml) }}
{{- $constraints := .stageValues.topologySpreadConstraints }}
{{- if not $constraints }}
{{- $constraints = list (dict "maxSkew" 1 "topologyKey" "topology.kubernetes.io/zone" "whenUnsatisfiable" "ScheduleAnyway") (dict "maxSkew" 1 "topologyKey" "kubernetes.io/hostname" "whenUnsatisfiable" "ScheduleAnyway") }}
{{- end }}
{{- range $constraints }}
{{- $constraint := deepCopy . }}
{{- if not $constraint.labelSelector }}
{{- $_ := set $constraint "labelSelector" $selector }}
{{- end }}
{{- if not $constraint.matchLabelKeys }}
{{- $_ := set $constraint "matchLabelKeys" (list "pod-template-hash") }}
{{- end }}
- {{ toYaml $constraint | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/*
Checks JSON Schema cannot express (it cannot compare two values). Each fails the render with a
message that names the value to change.
*/}}
{{- define "sgpipe.validate" -}}
{{- $kafka := default dict .Values.config.kafka }}
{{- if not $kafka.bootstrap_servers }}
{{- fail "config.kafka.bootstrap_servers is required: the Kafka bootstrap servers, e.g. my-cluster-kafka-bootstrap.kafka:9093" }}
{{- end }}
{{- $clickhouse := default dict .Values.config.clickhouse }}
{{- if not $clickhouse.url }}
{{- fail "config.clickhouse.url is required: the ClickHouse HTTP(S) URL, e.g. http://clickhouse-sgpipe.clickhouse:8123" }}
{{- end }}
{{- if not .Values.webhooks }}
{{- fail "webhooks: declare at least one SendGrid webhook (name and publicKeysSecret); SendGrid posts to /webhooks/<name>" }}
{{- end }}
{{- $names := list }}
{{- range .Values.webhooks }}
{{- if has .name $names }}
{{- fail (printf "webhooks: the name %s is used twice; each SendGrid webhook needs its own URL" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- $settings := default dict .settings }}
{{- if and (not (and .publicKeysSecret .publicKeysSecret.name)) (not $settings.allow_unsigned) }}
{{- fail (printf "webhooks[%s]: set publicKeysSecret (the Secret holding SendGrid's verification key) or settings.allow_unsigned: true" .name) }}
{{- end }}
{{- end }}
{{- $rawAuth := default dict .Values.config.raw_auth }}
{{- if and (not .Values.secrets.rawAuthKeys.name) (not $rawAuth.allow_unauthenticated) }}
{{- fail "secrets.rawAuthKeys is required: the Secret holding the raw-record HMAC keys, JSON [{\"id\": \"k1\", \"secret\": \"...\"}] (docs/kubernetes.md); or config.raw_auth.allow_unauthenticated: true" }}
{{- end }}
{{- $partitions := include "sgpipe.partitions" . | int }}
{{- range $stage := list "processor" "sink" }}
{{- $values := index $.Values $stage }}
{{- if and $values.autoscaling.enabled $values.keda.enabled }}
{{- fail (printf "%s: autoscaling.enabled and keda.enabled are exclusive; choose one autoscaler" $stage) }}
{{- end }}
{{- if gt ($values.replicas | int) $partitions }}
{{- fail (printf "%s.replicas (%d) exceeds config.kafka.topics.partitions (%d): a consumer beyond the partition count sits idle" $stage ($values.replicas | int) $partitions) }}
{{- end }}
{{- if and $values.autoscaling.enabled (gt ($values.autoscaling.maxReplicas | int) $partitions) }}
{{- fail (printf "%s.autoscaling.maxReplicas (%d) exceeds config.kafka.topics.partitions (%d): a consumer beyond the partition count sits idle" $stage ($values.autoscaling.maxReplicas | int) $partitions) }}
{{- end }}
{{- if and $values.keda.enabled (gt ($values.keda.maxReplicas | int) $partitions) }}
{{- fail (printf "%s.keda.maxReplicas (%d) exceeds config.kafka.topics.partitions (%d): a consumer beyond the partition count sits idle" $stage ($values.keda.maxReplicas | int) $partitions) }}
{{- end }}
{{- if and $values.keda.enabled (gt ($values.keda.minReplicas | int) ($values.keda.maxReplicas | int)) }}
{{- fail (printf "%s.keda.minReplicas exceeds %s.keda.maxReplicas" $stage $stage) }}
{{- end }}
{{- $stop := include "sgpipe.stopTimeoutSeconds" (dict "root" $ "stage" $stage) | float64 }}
{{- if le ($values.terminationGracePeriodSeconds | float64) $stop }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed config.%s.stop_timeout_seconds (%v), or Kubernetes kills the stage before it has written what it holds" $stage $values.terminationGracePeriodSeconds $stage $stop) }}
{{- end }}
{{- end }}
{{- range $stage := list "ingest" "processor" "sink" }}
{{- $values := index $.Values $stage }}
{{- if and $values.autoscaling.enabled (gt ($values.autoscaling.minReplicas | int) ($values.autoscaling.maxReplicas | int)) }}
{{- fail (printf "%s.autoscaling.minReplicas exceeds %s.autoscaling.maxReplicas" $stage $stage) }}
{{- end }}
{{- end }}
{{- if and (or .Values.processor.keda.enabled .Values.sink.keda.enabled) .Values.secrets.kafkaSaslPassword.name (not .Values.secrets.kafkaSaslUsername.name) }}
{{- fail "keda: KEDA reads Kafka credentials only from Secrets; set secrets.kafkaSaslUsername as well as secrets.kafkaSaslPassword" }}
{{- end }}
{{- if and .Values.ingest.ingress.enabled (not .Values.ingest.ingress.host) }}
{{- fail "ingest.ingress.host is required when the Ingress is enabled: SendGrid posts to https://<host>/webhooks/<name>" }}
{{- end }}
{{- end }}

{{/*
Policy-scanner findings this chart accepts, each with its reason, as checkov skip annotations
(https://www.checkov.io/2.Basics/Suppressing%20and%20Skipping%20Policies.html). The test suite
scans every ci/ scenario and fails on any other finding.
*/}}
{{- define "sgpipe.checkovSkips" -}}
{{- $skips := list "CKV_K8S_35: secrets reach sgpipe as SGPIPE_* environment variables because its one settings object reads file and environment only; they are SecretStr in the process and never logged" }}
{{- if not .Values.image.digest }}
{{- $skips = append $skips "CKV_K8S_43: the default image is the chart appVersion tag which releases never move; set image.digest to pin by digest" }}
{{- end }}
{{- if ne .Values.image.pullPolicy "Always" }}
{{- $skips = append $skips "CKV_K8S_15: IfNotPresent with an immutable release tag or a digest; Always would make the registry a dependency of every pod restart" }}
{{- end }}
{{- range $index, $skip := $skips }}
checkov.io/skip{{ add1 $index }}: {{ regexReplaceAll ": " $skip "=" | quote }}
{{- end }}
{{- end }}
