#!/usr/bin/env bash
# A medlora crossval study as a SLURM job array: one array task per study job, then the report.
#
#   scripts/slurm_array.sh submit CONFIG RUN_DIR     # on the login node: submits everything below
#
# `submit` reads the study's job list (`medlora crossval --list`: one `--only` selector per line, pretraining
# first) and submits, each waiting for the one before:
#   1. pretraining, one array task per pretraining seed (skipped when the study gives model.pretrained);
#   2. the jobs, one array task each: task i runs `medlora crossval --only <line i of the job list>`;
#   3. `medlora report RUN_DIR`, once every job task has ended (afterany: a failed job leaves the report out, and
#      the report says which jobs are missing; resubmit, done jobs are skipped).
# The tasks share RUN_DIR, which must be on a filesystem every node sees. Each task takes the job's lock under
# RUN_DIR/locks, so a task resubmitted while another still runs the same job skips it, and a job that finished
# (summary.json) is never redone. The data and folds are prepared by whichever task comes first, under a lock.
#
# Settings (environment variables; SBATCH options can also be given on the sbatch command line as usual):
#   MEDLORA        the medlora command (default: medlora; e.g. "/path/.venv/bin/medlora" or "python -m medlora.cli")
#   SBATCH_ARGS    extra options for every sbatch call, e.g. "--partition=gpu --gres=gpu:1 --time=02:00:00"
#   MAX_PARALLEL   at most this many job tasks at once (SLURM's --array=0-N%MAX_PARALLEL; default: no limit)
# The `pretrain`, `task` and `report` modes are what the submitted tasks run; SLURM_ARRAY_TASK_ID picks the line.
#SBATCH --job-name=medlora-study
#SBATCH --cpus-per-task=2
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

mode=${1:?usage: $0 submit|pretrain|task|report CONFIG RUN_DIR}
config=${2:?usage: $0 $mode CONFIG RUN_DIR}
run_dir=${3:?usage: $0 $mode CONFIG RUN_DIR}
read -r -a medlora <<< "${MEDLORA:-medlora}"
read -r -a extra <<< "${SBATCH_ARGS:-}"
script=$(readlink -f "$0")

# line N (0-based) of the pretraining or job part of `--list`
pick() {
    "${medlora[@]}" crossval --config "$config" --out "$run_dir" --list | grep "$1" | sed -n "$(( $2 + 1 ))p"
}

case "$mode" in
submit)
    listing=$("${medlora[@]}" crossval --config "$config" --out "$run_dir" --list)
    n_pretrain=$(grep -c '^\(pretrain\|stage=pretrain\)' <<< "$listing" || true)
    n_jobs=$(grep -c '^job=' <<< "$listing" || true)
    after=()
    if (( n_pretrain > 0 )); then
        pre=$(sbatch --parsable --array=0-$(( n_pretrain - 1 )) "${extra[@]}" "$script" pretrain "$config" "$run_dir")
        echo "pretraining: $pre ($n_pretrain task(s))"
        after=(--dependency=afterok:"$pre")
    fi
    limit=${MAX_PARALLEL:+%$MAX_PARALLEL}
    jobs=$(sbatch --parsable --array=0-$(( n_jobs - 1 ))$limit "${after[@]}" "${extra[@]}" "$script" task \
        "$config" "$run_dir")
    echo "jobs: $jobs ($n_jobs array tasks)"
    report=$(sbatch --parsable --dependency=afterany:"$jobs" "${extra[@]}" "$script" report "$config" "$run_dir")
    echo "report: $report"
    ;;
pretrain)
    only=$(pick '^\(pretrain\|stage=pretrain\)' "${SLURM_ARRAY_TASK_ID:?not an array task}")
    exec "${medlora[@]}" crossval --config "$config" --out "$run_dir" --only "$only"
    ;;
task)
    only=$(pick '^job=' "${SLURM_ARRAY_TASK_ID:?not an array task}")
    [[ -n $only ]] || { echo "array task $SLURM_ARRAY_TASK_ID: no such job in the study" >&2; exit 1; }
    exec "${medlora[@]}" crossval --config "$config" --out "$run_dir" --only "$only"
    ;;
report)
    exec "${medlora[@]}" report "$run_dir"
    ;;
*)
    echo "$0: unknown mode $mode (submit, pretrain, task, report)" >&2
    exit 2
    ;;
esac
