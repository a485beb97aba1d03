# Sourced by the sbatch scripts in slurm/ once they know $PROJECT (the repository).
# Picks the Python ($PRETRAIN_PYTHON, else the project's .venv, else python3 on PATH) and makes
# `python -m pretrain.*` and `python -m launch` importable without an install.

say() { echo "$(basename "${SCRIPT_NAME:-slurm}"): $*"; }

if [[ -n ${PRETRAIN_PYTHON:-} ]]; then
    PY=$PRETRAIN_PYTHON
elif [[ -x $PROJECT/.venv/bin/python ]]; then
    PY=$PROJECT/.venv/bin/python
else
    PY=python3
fi
export PYTHONPATH=$PROJECT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
