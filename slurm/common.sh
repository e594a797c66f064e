# shellcheck shell=bash
# Shared helpers of the slurm/ job scripts (sourced, not run). Everything a job needs before its
# srun step: repository, device mode, MASTER_ADDR/MASTER_PORT, per-job log directory, path checks,
# the srun launch with per-rank logs, the exit marker and requeue on the time-limit signal.
#
# Conventions (see docs/launch.md):
# - RUN_DIR is per job *name*, not per job id: a requeued or resubmitted job finds the previous
#   attempt's <RUN_DIR>/checkpoints/latest and rgkd-distill resumes from it.
# - LOG_DIR is per job id and attempt: <RGKD_LOG_ROOT>/<job id>[-r<restart>]/ holds rank-<N>.log per
#   task, job.env (the resolved knobs) and exit_status (the job's exit code, written last).
# - MASTER_ADDR is the first allocated node's NodeAddr from scontrol (node names need not resolve),
#   MASTER_PORT is 20000 + job id % 20000 (what rgkd_megatron.parallel.launch derives as well).

rgkd_die() {
  echo "rgkd: error: $*" >&2
  exit 2
}

rgkd_log() { echo "[rgkd $(date +%H:%M:%S)] $*"; }

# rgkd_split_words VAR STRING: split a space-separated override string into array VAR.
rgkd_split_words() {
  local -n _out="$1"
  read -r -a _out <<<"${2:-}"
}

# rgkd_need_path VAR KIND: the path in $VAR must exist (KIND: file, dir or any); exits naming VAR.
rgkd_need_path() {
  local var="$1" kind="$2" value="${!1:-}"
  [ -n "$value" ] || rgkd_die "$var is not set (export $var=/path/to/... before sbatch; see docs/launch.md)"
  case "$kind" in
    dir) [ -d "$value" ] || rgkd_die "$var=$value: no such directory" ;;
    file) [ -f "$value" ] || rgkd_die "$var=$value: no such file" ;;
    *) [ -e "$value" ] || rgkd_die "$var=$value: no such file or directory" ;;
  esac
}

# rgkd_device: "gpu" or "cpu" from RGKD_DEVICE (auto: gpu when nvidia-smi lists a GPU).
rgkd_device() {
  local want="${RGKD_DEVICE:-auto}"
  case "$want" in
    gpu | cpu) echo "$want" ;;
    auto)
      if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo gpu
      else
        echo cpu
      fi
      ;;
    *) rgkd_die "RGKD_DEVICE=$want: expected auto, gpu or cpu" ;;
  esac
}

# rgkd_master_addr: NodeAddr of the first node of the allocation.
rgkd_master_addr() {
  local first addr
  first="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}" | sed -n 1p)"
  [ -n "$first" ] || rgkd_die "SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST: scontrol show hostnames returned nothing"
  addr="$(scontrol show node "$first" 2>/dev/null | grep -oP 'NodeAddr=\K\S+' || true)"
  echo "${addr:-$first}"
}

# rgkd_setup_job: export MASTER_ADDR/MASTER_PORT, create LOG_DIR, set the runtime environment.
# Needs RUN_DIR and DEVICE; sets LOG_DIR.
rgkd_setup_job() {
  [ -n "${SLURM_JOB_ID:-}" ] || rgkd_die "not inside a SLURM job: submit with sbatch (or use --dry-run outside SLURM)"
  export MASTER_ADDR="${MASTER_ADDR:-$(rgkd_master_addr)}"
  export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  local attempt="${SLURM_JOB_ID}"
  if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then
    attempt="${SLURM_JOB_ID}-r${SLURM_RESTART_COUNT}"
  fi
  LOG_DIR="${RGKD_LOG_ROOT:-$RUN_DIR/logs}/$attempt"
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export PYTHONUNBUFFERED=1
  export WANDB_MODE="${WANDB_MODE:-offline}"
  if [ "$DEVICE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES=""
  else
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron-core TP/SP overlap
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  fi
}

# rgkd_checkpoint_note: say whether this attempt will resume (rgkd-distill decides; this only logs).
rgkd_checkpoint_note() {
  local latest="$RUN_DIR/checkpoints/latest"
  if [ -f "$latest" ]; then
    rgkd_log "found $latest ($(tr -d '\n' <"$latest")): rgkd-distill resumes from it"
  else
    rgkd_log "no checkpoint under $RUN_DIR/checkpoints: starting from the initial weights"
  fi
}

_rgkd_on_usr1() {  # the time-limit warning (#SBATCH --signal=B:USR1@...): requeue, resume later
  if [ "${RGKD_AUTO_REQUEUE:-1}" = 1 ]; then
    rgkd_log "time limit near: requeueing job $SLURM_JOB_ID (it resumes from the latest checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || rgkd_log "scontrol requeue failed"
  fi
}

_rgkd_on_exit() {
  local rc=$?
  if [ -n "${LOG_DIR:-}" ] && [ -d "$LOG_DIR" ]; then
    echo "$rc" >"$LOG_DIR/exit_status"
    if [ "$rc" != 0 ]; then
      local f
      for f in "$LOG_DIR"/rank-*.log; do
        [ -f "$f" ] || continue
        if grep -qE 'Traceback|Error|error:' "$f"; then
          echo "---- last lines of $f ----" >&2
          tail -n 30 "$f" >&2
        fi
      done
    fi
  fi
  rgkd_log "exit status $rc (logs: ${LOG_DIR:-none})"
}

# rgkd_srun CMD...: one task per GPU (per SLURM task in CPU mode) on every node of the allocation,
# each task's output in $LOG_DIR/rank-<global rank>.log, opening with a line naming its rank and node.
rgkd_srun() {
  trap _rgkd_on_usr1 USR1
  # shellcheck disable=SC2016  # expanded by each task's bash, not here
  local banner='echo "[rgkd] task ${SLURM_PROCID}/${SLURM_NTASKS} on node ${SLURMD_NODENAME} (local rank ${SLURM_LOCALID}, host $(hostname))"; exec "$@"'
  local srun_args=(--kill-on-bad-exit=1 --output "$LOG_DIR/rank-%t.log" --error "$LOG_DIR/rank-%t.log")
  local extra=()
  rgkd_split_words extra "${RGKD_SRUN_ARGS:-}"
  rgkd_log "srun ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?} nodes ($SLURM_JOB_NODELIST), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  rgkd_log "command: $*"
  srun "${srun_args[@]}" "${extra[@]}" bash -c "$banner" rgkd-task "$@" &
  local pid=$! rc=0
  while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # a trapped signal interrupts wait while srun still runs
  done
  if [ -f "$LOG_DIR/rank-0.log" ]; then
    echo "---- last lines of rank 0 ($LOG_DIR/rank-0.log) ----"
    grep -v -E 'UserWarning|warnings.warn' "$LOG_DIR/rank-0.log" | tail -n 15 || true
  fi
  return "$rc"
}

# rgkd_write_env FILE VAR...: record the resolved knobs of this attempt.
rgkd_write_env() {
  local file="$1" var
  shift
  : >"$file"
  for var in "$@"; do
    printf '%s=%q\n' "$var" "${!var:-}" >>"$file"
  done
}

# Path knobs of the distillation scripts: VAR -> the recipe field it sets and what it must be.
RGKD_PATH_VARS=(TEACHER_CKPT STUDENT_CKPT PROMPTS TOKENIZER TEACHER_MODEL_CONFIG TEACHER_CACHE)
declare -A RGKD_PATH_FIELD=(
  [TEACHER_CKPT]=pbkd.teacher_load [STUDENT_CKPT]=model.load [PROMPTS]=pbkd.prompts_path
  [TOKENIZER]=data.tokenizer [TEACHER_MODEL_CONFIG]=pbkd.teacher_model_config [TEACHER_CACHE]=pbkd.cache_path
)
declare -A RGKD_PATH_KIND=(
  [TEACHER_CKPT]=dir [STUDENT_CKPT]=dir [PROMPTS]=file [TOKENIZER]=any [TEACHER_MODEL_CONFIG]=file [TEACHER_CACHE]=dir
)

# rgkd_distill_main SCRIPT DEFAULT_RECIPE "REQUIRED VARS" ARGS...: the body of the rgkd-distill job
# scripts. With --dry-run (outside SLURM): rgkd-plan --memory for the recipe, exit with its status.
# Otherwise: check paths, set up the job, srun rgkd-distill on every task.
rgkd_distill_main() {
  local script="$1" default_recipe="$2" required="$3"
  shift 3
  local dry_run=0 arg
  local cli_overrides=()
  for arg in "$@"; do
    case "$arg" in
      --dry-run) dry_run=1 ;;
      -h | --help)
        sed -n '/^# Usage/,/^set -euo/p' "$script" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
      -*) rgkd_die "unknown option $arg (expected --dry-run, --help or section.field=value overrides)" ;;
      *) cli_overrides+=("$arg") ;;
    esac
  done

  RGKD_RECIPE="${RGKD_RECIPE:-$default_recipe}"
  GPU_TYPE="${GPU_TYPE:-H100-80GB}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
  [ -f "$RGKD_RECIPE" ] || rgkd_die "RGKD_RECIPE=$RGKD_RECIPE: no such file (relative paths are from $PWD)"
  local user_overrides=()
  rgkd_split_words user_overrides "${RGKD_OVERRIDES:-}"
  user_overrides+=("${cli_overrides[@]}")

  # Paths: every one that is set becomes an override and must exist; the default (real) recipe
  # needs the REQUIRED ones. A custom recipe (e.g. the tiny CI one) carries its own paths.
  local real=0 var
  [ "$RGKD_RECIPE" = "$default_recipe" ] && real=1
  local path_overrides=()
  for var in "${RGKD_PATH_VARS[@]}"; do
    if [ -n "${!var:-}" ]; then
      if [ "$dry_run" = 1 ] && [ ! -e "${!var}" ]; then
        echo "rgkd: warning: $var=${!var} does not exist (yet)" >&2
      elif [ "$dry_run" = 0 ]; then
        rgkd_need_path "$var" "${RGKD_PATH_KIND[$var]}"
      fi
      path_overrides+=("${RGKD_PATH_FIELD[$var]}=${!var}")
    elif [ "$real" = 1 ] && [[ " $required " == *" $var "* ]]; then
      if [ "$dry_run" = 1 ]; then  # plan before the checkpoints exist: a placeholder keeps validation quiet
        echo "rgkd: note: $var is not set; the job will refuse to start without it" >&2
        path_overrides+=("${RGKD_PATH_FIELD[$var]}=\$$var")
      else
        rgkd_need_path "$var" "${RGKD_PATH_KIND[$var]}"
      fi
    fi
  done

  if [ "$dry_run" = 1 ]; then
    local plan="${RGKD_PLAN:-$PWD/.venv/bin/rgkd-plan}"
    [ -x "$plan" ] || rgkd_die "RGKD_PLAN=$plan: not an executable (run \`bash scripts/install.sh\` first)"
    # the job's size: RGKD_NODES, else the script's own "#SBATCH --nodes=N"
    local nodes="${RGKD_NODES:-$(grep -oP '^#SBATCH --nodes=\K[0-9]+' "$script" | head -n 1)}"
    [ -n "$nodes" ] || rgkd_die "RGKD_NODES: not set and $script has no '#SBATCH --nodes=N' line"
    local rc=0
    "$plan" --config "$RGKD_RECIPE" --memory --gpu "$GPU_TYPE" --gpus-per-node "$GPUS_PER_NODE" \
      --world-size "$((nodes * GPUS_PER_NODE))" "${path_overrides[@]}" "${user_overrides[@]}" || rc=$?
    case "$rc" in
      0) ;;
      3) echo "rgkd: dry run: the recipe does not fit on $GPU_TYPE x $GPUS_PER_NODE per node (rgkd-plan exit 3)" >&2 ;;
      2) echo "rgkd: dry run: rgkd-plan rejected the input (exit 2; message above)" >&2 ;;
      *) echo "rgkd: dry run: rgkd-plan failed (exit $rc)" >&2 ;;
    esac
    exit "$rc"
  fi

  DEVICE="$(rgkd_device)"
  PYTHON="${RGKD_PYTHON:-$PWD/.venv/bin/python}"
  [ -x "$PYTHON" ] || rgkd_die "RGKD_PYTHON=$PYTHON: not an executable (run \`bash scripts/install.sh\`, or point RGKD_PYTHON at your environment's python)"
  RUN_DIR="${RUN_DIR:-${RGKD_RUNS_ROOT:-$PWD/runs}/${SLURM_JOB_NAME:-$(basename "$script" .sh)}}"
  rgkd_setup_job
  trap _rgkd_on_exit EXIT

  local device_overrides=()
  if [ "$DEVICE" = cpu ]; then
    device_overrides=(parallel.backend=gloo)
  else
    local gpus tasks="${SLURM_NTASKS_PER_NODE:-${GPUS_PER_NODE}}"
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [ "$gpus" -ge "$tasks" ] || rgkd_die "$tasks tasks per node but this node has $gpus GPU(s): launch one task per GPU (sbatch --ntasks-per-node=$gpus, GPUS_PER_NODE)"
  fi

  rgkd_write_env "$LOG_DIR/job.env" RGKD_RECIPE RGKD_OVERRIDES RUN_DIR LOG_DIR DEVICE PYTHON MASTER_ADDR MASTER_PORT \
    SLURM_JOB_ID SLURM_JOB_NAME SLURM_JOB_NODELIST SLURM_NTASKS SLURM_RESTART_COUNT "${RGKD_PATH_VARS[@]}"
  rgkd_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) attempt ${SLURM_RESTART_COUNT:-0}: recipe $RGKD_RECIPE on $DEVICE"
  rgkd_log "run dir $RUN_DIR, log dir $LOG_DIR"
  rgkd_checkpoint_note
  rgkd_srun "$PYTHON" -m rgkd_megatron.cli.distill --config "$RGKD_RECIPE" \
    "${path_overrides[@]}" "${device_overrides[@]}" "${user_overrides[@]}" "logging.run_dir=$RUN_DIR"
}
