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
# The image keeps no pip cache in its layers. The tests set BUILD_VENV_PIP_CACHE=1 to reuse the
# developer's cache: the same packages install either way, ~20 s sooner.
if [ "${BUILD_VENV_PIP_CACHE:-0}" != 1 ]; then
    export PIP_NO_CACHE_DIR=1
fi

# The wheel alone (--no-deps): its dependencies come from the index below, as wheels.
"$python" -m pip wheel --no-deps --wheel-dir "$wheel_dir" "$src"
wheel=$(ls "$wheel_dir"/sgpipe-*.whl)

# The runtime image needs no installer: the virtualenv is made without pip, and the builder's
# pip installs into it (--python, pip >= 22.3).
"$python" -m venv --without-pip "$venv"
# --only-binary: a dependency that would need a compiler fails the build here instead of
# pulling a toolchain into the builder stage.
"$python" -m pip --python "$venv/bin/python" install --only-binary=:all: "$wheel"
