# shellcheck shell=sh
# /etc/profile.d/mpistyle.sh: installed on every node by the mpistyle cluster-init
# (specs/default), which replaces @MPISTYLE_ROOT@. Login shells, and so the jobs sbatch submits
# from them, get what slurm/style.sbatch reads: the Python that has mpistyle, the staging area,
# and where run directories go; plus the environment's bin/ on PATH for `mpistyle` itself.
# Plain sh: /etc/profile.d is read by every login shell, not only bash.
mpistyle_root="@MPISTYLE_ROOT@"
export MPISTYLE_PYTHON="$mpistyle_root/venv/bin/python"
export MPISTYLE_STAGING="$mpistyle_root/staging"
export MPISTYLE_RUNS_DIR="$mpistyle_root/runs"
case ":$PATH:" in
  *":$mpistyle_root/venv/bin:"*) ;;
  *) PATH="$mpistyle_root/venv/bin:$PATH"; export PATH ;;
esac
unset mpistyle_root
