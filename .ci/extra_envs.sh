#!/usr/bin/env bash
# The tests that need environments of their own, after the main suite (the last step of README's test command):
#   - tests/test_deploy_app.py: the MONAI Deploy App SDK application (requirements-deploy.txt);
#   - tests/test_monailabel_server.py: a real MONAI Label server (requirements-label-server.txt).
# Each environment is a virtualenv outside the repository (.ci/venv.sh: built once, reused while its pins stay the
# same). BUNDLE_REQUIRE_ENV makes a test module fail, not skip, when its environment lacks a piece.
set -euo pipefail
cd "$(dirname "$0")/.."

stage() {  # stage NAME COMMAND...: run COMMAND, then say on stderr how long it took
    local name=$1 start=$SECONDS
    shift
    "$@"
    echo "ci: $name: $((SECONDS - start)) s" >&2
}

stage "deploy environment" bash .ci/venv.sh deploy requirements-deploy.txt >/dev/null
stage "label environment" bash .ci/venv.sh label requirements-label-server.txt >/dev/null
deploy=$(bash .ci/venv.sh deploy requirements-deploy.txt)
label=$(bash .ci/venv.sh label requirements-label-server.txt)

# Holoscan asks for an 8x larger stack than the default; the SDK's `import monai.deploy` loads the CUDA runtime library
# (libcudart), which nvidia-cuda-runtime ships where no CUDA toolkit is installed.
ulimit -s 32768
cudart=$(echo "$deploy"/lib/python3*/site-packages/nvidia/cu13/lib)
stage "deploy tests" env BUNDLE_REQUIRE_ENV=deploy LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    "$deploy/bin/python" -m pytest -q tests/test_deploy_app.py
stage "MONAI Label server tests" env BUNDLE_REQUIRE_ENV=label "$label/bin/python" -m pytest -q tests/test_monailabel_server.py
