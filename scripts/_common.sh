# shellcheck shell=bash
# Sourced by every script in scripts/: flags, environment, the launcher and smoke mode, in one place.
#
# A script sets ALL_TASKS, SMOKE_TASKS (run by --smoke without task names), SMOKE_MODELS (hub names) and
# optionally DEFAULT_TASKS (run without task names; default ALL_TASKS), sources this file, calls
# `parse_args "$@"`, then `setup_run`, and runs `launch ENTRY FLAGS...` once per task.
#
# Environment (each overridable):
#   NPROC      processes per run (default 1); > 1 launches `python -m torch.distributed.run --nproc_per_node NPROC`
#   MODEL_DIR  folder holding the models as MODEL_DIR/<hub name> (default: none, the hub name is passed and
#              run_glue.py looks in models/<hub name>, then downloads)
#   DATA_DIR   GLUE folder (default data: data/MNLI/train.tsv ... or data/glue/mnli from data/download_glue.py)
#   OUT_DIR    where the runs go (default outputs/<script name>)
#   PYTHON     interpreter (default: the repository's .venv/bin/python, else python3)
#   SMOKE_DIR  smoke mode: where the tiny models and GLUE files are built (default .cache/smoke in the repo)
#   RECIPE     released (default): the released scripts' values; paper: the paper's table where the two disagree
#              (scripts/README.md lists every disagreement); passed on as --recipe where the entry point records it
#   SEEDS      space-separated seeds (default: the paper's count, see each script; smoke mode: the first only)
#   KEEP_PER_DEVICE_BATCH  1: keep the original per-device batch on any NPROC (the global batch then scales
#              with NPROC); default: the paper's global batch, by gradient accumulation (see global_batch)
#   FRESH      1: run every training again from scratch (the original scripts' --overwrite_output_dir). Default:
#              a rerun of the same command skips the runs it finished and resumes an interrupted one from its
#              latest checkpoint (see launch)
set -euo pipefail

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$SCRIPTS_DIR")
SCRIPT_NAME=$(basename "$0" .sh)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
NPROC=${NPROC:-1}
RECIPE=${RECIPE:-released}
KEEP_PER_DEVICE_BATCH=${KEEP_PER_DEVICE_BATCH:-0}
SMOKE=0
TASKS=()
SMOKE_ARGS=()

die() { echo "$SCRIPT_NAME: error: $*" >&2; exit 2; }

usage() {  # the script's header comment, without the '#'
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

parse_args() {
    local arg task
    for arg in "$@"; do
        case $arg in
            --smoke) SMOKE=1 ;;
            -h|--help) usage; exit 0 ;;
            -*) die "unknown option $arg (expected --smoke, --help, or task names: ${ALL_TASKS[*]})" ;;
            all) TASKS+=("${ALL_TASKS[@]}") ;;
            *)
                task=${arg,,}
                [[ " ${ALL_TASKS[*]} " == *" $task "* ]] || die "unknown task '$arg' (expected some of: ${ALL_TASKS[*]}, or all)"
                TASKS+=("$task") ;;
        esac
    done
    if (( ${#TASKS[@]} == 0 )); then
        if (( SMOKE )); then
            TASKS=("${SMOKE_TASKS[@]}")
        elif [[ -n ${DEFAULT_TASKS[*]+set} ]]; then
            TASKS=("${DEFAULT_TASKS[@]}")
        else
            TASKS=("${ALL_TASKS[@]}")
        fi
    fi
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
    [[ $RECIPE == released || $RECIPE == paper ]] || die "RECIPE must be released or paper, got '$RECIPE'"
    [[ $KEEP_PER_DEVICE_BATCH == 0 || $KEEP_PER_DEVICE_BATCH == 1 ]] \
        || die "KEEP_PER_DEVICE_BATCH must be 0 or 1, got '$KEEP_PER_DEVICE_BATCH'"
    if [[ -n ${SEEDS:-} ]]; then
        local seed
        for seed in $SEEDS; do [[ $seed =~ ^[0-9]+$ ]] || die "SEEDS must list non-negative integers, got '$SEEDS'"; done
    fi
}

# Smoke mode: build (once) the tiny stand-ins of SMOKE_MODELS and the tiny GLUE folder, and point MODEL_DIR
# and DATA_DIR at them. Everything else (flags, launcher, chaining, results files) is the real run's; the
# appended SMOKE_ARGS only cap the run at a few optimizer steps (argparse keeps the last value of a flag).
setup_smoke() {
    SMOKE_DIR=${SMOKE_DIR:-$REPO/.cache/smoke}
    local name missing=()
    for name in "${SMOKE_MODELS[@]}"; do
        [[ -f $SMOKE_DIR/models/$name/.smoke-complete ]] || missing+=("$name")
    done
    if (( ${#missing[@]} )) || [[ ! -f $SMOKE_DIR/glue/.smoke-complete ]]; then
        local joined
        joined=$(IFS=,; echo "${SMOKE_MODELS[*]}")
        "$PYTHON" "$SCRIPTS_DIR/_smoke_assets.py" --root "$SMOKE_DIR" --models "$joined" >/dev/null
    fi
    MODEL_DIR=$SMOKE_DIR/models
    DATA_DIR=$SMOKE_DIR/glue
    OUT_DIR=${OUT_DIR:-$SMOKE_DIR/runs/$SCRIPT_NAME}
    SMOKE_ARGS=(--max_steps 2 --eval_steps 1 --save_steps 1 --logging_steps 1 --dataloader_num_workers 0
                --disable_tqdm)
}

# setup_run: the smoke or the real paths, and the environment of the original scripts.
setup_run() {
    if (( SMOKE )); then
        setup_smoke
    else
        DATA_DIR=${DATA_DIR:-data}
        OUT_DIR=${OUT_DIR:-outputs/$SCRIPT_NAME}
    fi
    MODEL_DIR=${MODEL_DIR:-}
    export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
}

# global_batch TASK PER_DEVICE PROCS [ACCUM]: the original ran PER_DEVICE x PROCS processes x ACCUM (default 1)
# accumulation steps. Sets BATCH_FLAGS (--per_device_train_batch_size, --gradient_accumulation_steps) so that
# NPROC processes train on the same global batch: the per-device batch is kept and the accumulation makes up
# the rest (NPROC 1 of an 8-process original: accumulation x 8); with more processes than the original, the
# per-device batch shrinks. KEEP_PER_DEVICE_BATCH=1 keeps the original's per-device batch and accumulation
# (the global batch then scales with NPROC). Prints the effective configuration on stderr.
global_batch() {
    local task=$1 per_device=$2 procs=$3 accum=${4:-1}
    local paper=$((per_device * procs * accum)) batch=$per_device steps=$accum
    if (( ! KEEP_PER_DEVICE_BATCH )); then
        if (( paper % (per_device * NPROC) == 0 )); then
            steps=$((paper / (per_device * NPROC)))
        elif (( paper % NPROC == 0 )); then
            batch=$((paper / NPROC)); steps=1
        else
            die "$task: the paper's global batch $paper (per-device $per_device x $procs process(es) x" \
                "accumulation $accum) cannot be split over NPROC=$NPROC processes: use an NPROC that divides" \
                "$paper, or KEEP_PER_DEVICE_BATCH=1"
        fi
    fi
    BATCH_FLAGS=(--per_device_train_batch_size "$batch" --gradient_accumulation_steps "$steps")
    local global=$((batch * NPROC * steps)) verdict="the paper's"
    (( global == paper )) || verdict="NOT the paper's $paper (KEEP_PER_DEVICE_BATCH=1)"
    echo "$SCRIPT_NAME: $task: global batch $global = per-device $batch x NPROC $NPROC x accumulation $steps," \
         "$verdict (the original: $per_device x $procs process(es) x $accum); recipe $RECIPE" >&2
}

# warmup_flags WARMUP: the recipe column "ratio:R" as --warmup_ratio R, a step count N as --warmup_steps N
# (into the array warmup_flag).
warmup_flags() {
    case $1 in
        ratio:*) warmup_flag=(--warmup_ratio "${1#ratio:}") ;;
        *) warmup_flag=(--warmup_steps "$1") ;;
    esac
}

# seed_list DEFAULT...: the seeds to run: SEEDS when set, else the defaults (the paper's count); smoke mode
# runs only the first unless SEEDS is set.
seed_list() {
    if [[ -n ${SEEDS:-} ]]; then
        echo "$SEEDS"
    elif (( SMOKE )); then
        echo "$1"
    else
        echo "$*"
    fi
}

# recipe_row TASK: the task's line of the table RELEASED (the released scripts' values), or of PAPER (the
# paper's table, rows only where it differs) when RECIPE=paper.
recipe_row() {
    local line=""
    if [[ $RECIPE == paper && -n ${PAPER:-} ]]; then line=$(grep -E "^$1 " <<<"$PAPER" || true); fi
    [[ -n $line ]] || line=$(grep -E "^$1 " <<<"$RELEASED")
    echo "$line"
}

model_path() {  # hub name -> what --model_name_or_path gets
    echo "${MODEL_DIR:+$MODEL_DIR/}$1"
}

# launch ENTRY FLAGS...: one run of ENTRY (a path under the repository), on NPROC processes.
# A training run's output folder (--output_dir / --work_dir / --root_output_dir ROOT: ROOT/model) records its
# command (NPROC and flags) in LAUNCH_RECORD before it starts. Rerun by the same command: finished
# (train_results.json, and eval_results.json where the entry point evaluates) it is skipped; interrupted (a
# checkpoint-* folder) it resumes with --resume_from_checkpoint latest instead of overwriting (the entry point
# refuses a resume whose settings differ). A folder holding a run of another command, or a finished run with no
# record (made before reruns were recorded), is an error. FRESH=1 runs it from scratch, as the originals did.
LAUNCH_RECORD=launch_command.txt
launch() {
    local entry=$REPO/$1
    shift
    local cmd=("$PYTHON")
    if (( NPROC > 1 )); then
        cmd+=(-m torch.distributed.run --standalone --nproc_per_node "$NPROC")
    fi
    local run=("$entry" "$@" "${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"}")
    local out="" flag="" prev="" arg
    for arg in "${run[@]}"; do
        case $prev in
            --output_dir|--work_dir) out=$arg flag=$prev ;;
            --root_output_dir) out=$arg/model flag=--output_dir ;;  # LoRA²'s flag: the run goes to ROOT/model
        esac
        prev=$arg
    done
    if [[ -n $out ]] && training_run "${run[@]}"; then
        prepare_rerun "$out" "$flag" "NPROC=$NPROC$(printf ' %q' "${run[@]}")" "${run[@]}" || return 0
        run=("${RERUN[@]}")
    fi
    cmd+=("${run[@]}")
    printf '+' >&2; printf ' %q' "${cmd[@]}" >&2; echo >&2  # the exact command, ready to paste
    "${cmd[@]}"
}

# training_run ENTRY FLAGS...: does this run train? (--do_train, or an entry point that trains by default)
training_run() {
    local entry=${1#"$REPO"/} flags=" ${*:2} "
    [[ $flags == *" --no-do_train "* || $flags == *" --no_do_train "* ]] && return 1
    [[ $flags == *" --do_train "* ]] && return 0
    case $entry in examples/NLG/gpt2_ft.py|lorapro/train.py|lorapro/run_t5_glue.py|loraplus/run_glue.py) return 0 ;; esac
    return 1
}

# evaluating_run ENTRY FLAGS...: does the entry point write eval_results.json when it finishes?
evaluating_run() {
    local entry=${1#"$REPO"/} flags=" ${*:2} "
    [[ $flags == *" --no_do_eval "* || $flags == *" --no-do_eval "* ]] && return 1
    case $entry in
        examples/NLG/gpt2_ft.py) return 1 ;;  # eval_nlg.py scores it later
        lorapro/run_t5_glue.py|loraplus/run_glue.py) return 0 ;;
    esac
    [[ $flags == *" --do_eval "* ]]
}

# prepare_rerun OUT FLAG LINE RUN...: sets RERUN (the run's flags, for a resume or FRESH=1) and writes LINE to
# OUT/LAUNCH_RECORD; returns 1 when the run is to be skipped (finished by this command).
prepare_rerun() {
    local out=$1 flag=$2 line=$3 arg
    shift 3
    RERUN=("$@")
    local record=$out/$LAUNCH_RECORD checkpoints=() finished=0
    local nullglob_was; nullglob_was=$(shopt -p nullglob); shopt -s nullglob
    checkpoints=("$out"/checkpoint-*)
    eval "$nullglob_was"
    if [[ -f $out/train_results.json ]] && { ! evaluating_run "$@" || [[ -f $out/eval_results.json ]]; }; then
        finished=1
    fi
    if [[ ${FRESH:-0} == 1 ]]; then
        if [[ -d $out && " $* " != *" --overwrite_output_dir "* && " $* " != *" --overwrite_work_dir "* ]]; then
            [[ $flag == --work_dir ]] && RERUN+=(--overwrite_work_dir) || RERUN+=(--overwrite_output_dir)
        fi
    elif (( finished || ${#checkpoints[@]} )); then
        [[ -f $record ]] || die "$out holds a run with no $LAUNCH_RECORD (made before reruns were recorded):" \
            "FRESH=1 trains it again, or use another OUT_DIR"
        [[ $(<"$record") == "$line" ]] || die "$out holds a run of another command (see $record): use another" \
            "OUT_DIR, or FRESH=1 to replace it"
        if (( finished )); then
            echo "$SCRIPT_NAME: $out: finished by this command before, skipped (FRESH=1 runs it again)" >&2
            return 1
        fi
        RERUN=()
        for arg in "$@"; do
            [[ $arg == --overwrite_output_dir || $arg == --overwrite_work_dir ]] || RERUN+=("$arg")
        done
        RERUN+=(--resume_from_checkpoint latest)
        echo "$SCRIPT_NAME: $out: interrupted before, resumed from its latest checkpoint (FRESH=1 starts over)" >&2
    fi
    mkdir -p "$out" && printf '%s\n' "$line" >"$record"
}

# mnli_lora TASK [SEED]: the paper's MRPC, RTE and STS-B runs start from the MNLI LoRA checkpoint: MNLI_LORA when
# set (e.g. microsoft's released roberta_base_lora_mnli.bin; ignored in smoke mode, whose tiny models fit no real
# adapter), else the best adapter (else the last) of this script's own MNLI run of the same seed.
mnli_lora() {
    if [[ -n ${MNLI_LORA:-} ]] && (( ! SMOKE )); then
        [[ -e $MNLI_LORA ]] || die "MNLI_LORA=$MNLI_LORA does not exist"
        echo "$MNLI_LORA"
        return
    fi
    local run=$OUT_DIR/mnli/${2:+seed$2/}model candidate
    if [[ -d $run && ! -f $run/train_results.json ]]; then
        die "$1 starts from the MNLI LoRA checkpoint, and the MNLI run $run has not finished (no" \
            "train_results.json): rerun the mnli task first (it resumes), or set MNLI_LORA"
    fi
    if [[ -f $run/run_config.json ]] && ! grep -q "\"recipe\": \"$RECIPE\"" "$run/run_config.json"; then
        die "$1 starts from the MNLI LoRA checkpoint, and the MNLI run $run was made under another recipe" \
            "than RECIPE=$RECIPE (see its run_config.json): run mnli with this RECIPE into another OUT_DIR first"
    fi
    for candidate in "$run/best_adapter" "$run/adapter"; do
        if [[ -d $candidate ]]; then echo "$candidate"; return; fi
    done
    die "$1 starts from the MNLI LoRA checkpoint, and $run has none: run the mnli task first (same OUT_DIR" \
        "and SEEDS), or set MNLI_LORA to an adapter (e.g. a released *_lora_mnli.bin)"
}
