# Sourced by the device scripts (gpu_check.sh, mainjob_gpu.sh) on a lent machine with no network: installs
# what the machine lacks from the wheelhouse (.whl/, built here by `python scripts/gpu_wheelhouse.py build`
# and carried) beside the machine's own python3 and torch, and sets the environment of an offline run.
# Needs $out (the folder for install.log); sets $py.
py=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $py scripts/gpu_wheelhouse.py install /tmp/ganlab-site >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
  export PYTHONPATH="/tmp/ganlab-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"        # dependencies already importable (a dev machine)
fi
export PYTHONUNBUFFERED=1 GANLAB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
