#!/bin/sh
# Builds sgpipe's wheel from SRC into WHEEL_DIR and installs it, with its runtime dependencies
# only, into a fresh virtualenv at VENV. The Dockerfile's builder stage runs exactly this script,
# and tests/image/ runs it too, so the virtualenv the tests check is built the way the image's is.
#
#   docker/build-venv.sh SRC WHEEL_DIR VENV
#
# No extras are installed: `embedded` (tansu broker, chdb) serves only `sgpipe up` on a laptop
# and would add ~300 MB and a second binary to a production image.
set -eu

if [ "$#" -ne 3 ]; then
    echo "usage: $0 SRC WHEEL_DIR VENV" >&2
    exit 2
fi
src=$1
wheel_dir=$2
venv=$3
python=${PYTHON:-python3}

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# uv builds and installs (the installer the Makefile uses): the same wheel and packages pip
# would, with a fifth of pip's CPU (measured: 6 s against 21 s). Installed for this build where
# the builder lacks it; the runtime image never gets it.
if ! "$python" -m uv --version >/dev/null 2>&1; then
    "$python" -m pip install --quiet uv
fi
# The image keeps no cache in its layers. The tests set BUILD_VENV_PIP_CACHE=1 to reuse the
# developer's cache: the same packages install either way, sooner.
cache=--no-cache
if [ "${BUILD_VENV_PIP_CACHE:-0}" = 1 ]; then
    cache=
fi

# The wheel alone: its dependencies come from the index below, as wheels.
"$python" -m uv build --quiet $cache --wheel --out-dir "$wheel_dir" "$src"
wheel=$(ls "$wheel_dir"/sgpipe-*.whl)

# The runtime image needs no installer: the virtualenv is made without pip, and uv installs
# into it. --only-binary: a dependency that would need a compiler fails the build here instead
# of pulling a toolchain into the builder stage. --compile-bytecode, as pip does by default: the
# image's root filesystem is read-only, so nothing could write it at run time.
"$python" -m venv --without-pip "$venv"
"$python" -m uv pip install --quiet $cache --python "$venv/bin/python" --only-binary :all: \
    --compile-bytecode "$wheel"
