{{/*
One Deployment per stage: (dict "root" $ "component" "processor" "command" "process").
The stages share an image, a config file and a pod shape; they differ in the command, the
port they serve health and metrics on, the secrets they get and how they scale.
*/}}
{{- define "sgpipe.deployment" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $values := index $root.Values $component }}
{{- $port := ternary (include "sgpipe.ingestPort" $root) (include "sgpipe.healthPort" (dict "root" $root "stage" $component)) (eq $component "ingest") | int }}
{{- $scaledExternally := or $values.autoscaling.enabled (and (hasKey $values "keda") $values.keda.enabled) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "sgpipe.fullname" $root }}-{{ $component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "sgpipe.componentLabels" (dict "root" $root "component" $component) | nindent 4 }}
  annotations:
    {{- include "sgpipe.checkovSkips" $root | nindent 4 }}
spec:
  {{- if not $scaledExternally }}
  replicas: {{ $values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "sgpipe.componentSelectorLabels" (dict "root" $root "component" $component) | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      {{- if eq $component "ingest" }}
      # Never fewer ready ingress pods than asked for: SendGrid keeps posting during a rollout.
      maxSurge: 1
      maxUnavailable: 0
      {{- else }}
      # A consumer beyond the partition count would sit idle: replace in place, one at a time.
      maxSurge: 0
      maxUnavailable: 1
      {{- end }}
  template:
    metadata:
      labels:
        {{- include "sgpipe.componentLabels" (dict "root" $root "component" $component) | nindent 8 }}
        {{- with $values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Rolls the pods when the rendered sgpipe.yaml changes (Secrets are not watched: see
        # docs/kubernetes.md, "Rotating secrets").
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "sgpipe.serviceAccountName" $root }}
      # sgpipe talks to no Kubernetes API.
      automountServiceAccountToken: false
      # Service links would inject SGPIPE_INGEST_PORT=tcp://... for a Service named
      # "sgpipe-ingest", and sgpipe reads every SGPIPE_* variable as a setting.
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ $component }}
          image: {{ include "sgpipe.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            - {{ .command }}
            - --config
            - /etc/sgpipe/sgpipe.yaml
          ports:
            - name: http
              containerPort: {{ $port }}
              protocol: TCP
          {{- $env := include "sgpipe.secretEnv" (dict "root" $root "stage" $component) | trim }}
          {{- if or $env $root.Values.extraEnv }}
          env:
            {{- with $env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $root.Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- end }}
          startupProbe:
            {{- include "sgpipe.httpProbe" (dict "path" "/healthz" "probe" $values.probes.startup) | nindent 12 }}
          livenessProbe:
            {{- include "sgpipe.httpProbe" (dict "path" "/healthz" "probe" $values.probes.liveness) | nindent 12 }}
          readinessProbe:
            {{- include "sgpipe.httpProbe" (dict "path" "/readyz" "probe" $values.probes.readiness) | nindent 12 }}
          {{- if and (eq $component "ingest") (gt ($values.preStopSleepSeconds | int) 0) }}
          lifecycle:
            # Endpoints are removed asynchronously after SIGTERM: keep answering for a moment
            # so that requests already routed here are not refused.
            preStop:
              exec:
                command: ["sleep", "{{ $values.preStopSleepSeconds }}"]
          {{- end }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "sgpipe.volumeMounts" $root | nindent 12 }}
            {{- if eq $component "ingest" }}
            {{- include "sgpipe.oauthSigningKeyMount" $root | nindent 12 }}
            {{- end }}
      volumes:
        {{- include "sgpipe.volumes" (dict "root" $root "configMap" (include "sgpipe.fullname" $root)) | nindent 8 }}
        {{- if eq $component "ingest" }}
        {{- include "sgpipe.oauthSigningKeyVolume" $root | nindent 8 }}
        {{- end }}
      topologySpreadConstraints:
        {{- include "sgpipe.topologySpread" (dict "root" $root "component" $component "stageValues" $values) | trim | nindent 8 }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
