#!/usr/bin/env bash
# gqe-train against faults beyond malformed files: threads the system refuses, two processes on one
# --out, "--resume ." inside a run's folder, --resume with flags it cannot honour and with --steps,
# an edited train_state.json promising a huge model, a model beyond the machine's memory, a text
# comparison resumed from another working folder, one seed (no spread to show). Refusals are exit
# status 2 with one line on stderr.
# Usage: check_train_faults.sh GQE_TRAIN SCRATCH [sanitized]
set -u
train=$(realpath "$1") tmp=$2 sanitized=${3:-}
rm -rf "$tmp" && mkdir -p "$tmp" || exit 1
background=
cleanup() {
  if [[ -n $background ]]; then kill "$background" 2> /dev/null; wait "$background" 2> /dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
check_timeout=300
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"
state_step() { grep -o '"step": *[0-9]*' "$1/train_state.json" | head -n 1 | grep -o '[0-9]*$'; }

# A closed pipe behind stdout is a write error, never a signal.
refused version_into_closed_pipe "cannot write to standard output: Broken pipe" bash -c "$closed_pipe" "$tmp" "$train" --version

# A small shape, so that every run takes seconds.
small=(--hidden 16 --layers 1 --heads 2 --kv-heads 1 --head-dim 8 --intermediate 32 --batch 4 --seq-len 32
       --mqar-pairs 4 --mqar-vocab 32 --seeds 1 --save-every 0 --warmup 2)

# Threads the system refuses: exit 2 and one line, before any output folder is made.
if [[ -n $sanitized ]]; then
  echo "skip threads_refused: sanitizers reserve terabytes of address space, so ulimit -v cannot be set"
else
  refused threads_refused "the system refused to start thread" \
    bash -c 'ulimit -v 400000 && exec "$0" --threads 512 --steps 2 --out "$1/threads"' "$train" "$tmp"
  check threads_refused_made_no_folder test ! -e "$tmp/threads"
fi

# Decimal flags are plain decimal numbers: "" is not 0, nor " 0.1" or 0x1p-3 a number; no run starts.
for bad in "--lr|" "--lr| 0.1" "--lr|0x1p-3" "--lr|1e-400" "--aux-coef|" "--aux-coef|inf" "--weight-decay|" "--weight-decay|1.5"; do
  flag=${bad%%|*} value=${bad#*|}
  refused "decimal_${flag#--}_'$value'" "$flag: value" "$train" "${small[@]}" --steps 3 --out "$tmp/decimal" "$flag" "$value"
done
check decimal_refusals_made_no_folder test ! -e "$tmp/decimal"

# An option of one value given twice is named; no run starts.
refused steps_twice "--steps: given 2 times; expected once" "$train" "${small[@]}" --steps 3 --steps 4 --out "$tmp/twice"
check steps_twice_made_no_folder test ! -e "$tmp/twice"

# Two processes on one --out: the second is refused up front while the first runs.
"$train" "${small[@]}" --steps 1000000 --out "$tmp/two" > "$tmp/first.out" 2> "$tmp/first.err" &
background=$!
for _ in $(seq 600); do [[ -e $tmp/two/comparison.json ]] && break; sleep 0.1; done
refused second_process_refused "is in use by another process" "$train" "${small[@]}" --steps 5 --out "$tmp/two"
refused second_resume_refused "is in use by another process" "$train" --resume "$tmp/two"
# Ctrl-C: the first saves its run and exits 130.
sleep 1
kill -INT "$background"
wait "$background"
status=$?
background=
check first_process_interrupted test "$status" = 130
run="$tmp/two/gqa-seed0"
check interrupted_run_saved test -f "$run/train_state.json"
done_steps=$(state_step "$run")

# "--resume ." inside the run's folder, with --steps as the new total: the folder itself
# is replaced (no "..saving" inside it, no sibling left), and the run ends at the new total.
target=$((done_steps + 3))
succeeds resume_dot_with_steps bash -c 'cd "$0" && exec "$1" --resume . --steps "$2"' "$run" "$train" "$target"
check resume_dot_reached_the_new_total test "$(state_step "$run")" = "$target"
check resume_dot_left_no_saving_inside test ! -e "$run/..saving"
check resume_dot_left_no_siblings test "$(ls -A "$tmp/two" | grep -c 'seed0\.')" = 0
# Flags that a resumed run cannot honour are refused, not ignored.
refused resume_with_lr "--lr cannot change a resumed run" "$train" --resume "$tmp/two" --lr 0.5
refused resume_with_out "--out cannot change a resumed run" "$train" --resume "$tmp/two" --out "$tmp/elsewhere"
refused resume_with_hidden "--hidden cannot change a resumed run" "$train" --resume "$run" --hidden 32
refused resume_below_done "expected at least" "$train" --resume "$run" --steps 1
check refusals_made_nothing test ! -e "$tmp/elsewhere"

# An edited train_state.json that promises a far larger model is refused from the files'
# headers, before memory is taken: under a 500 MB address-space limit, the refusal and not the
# allocation must come first (the run would need about 800 MB for its parameters, gradients and moments).
cp -R "$run" "$tmp/edited"
sed -i -e 's/"hidden_size": *[0-9]*/"hidden_size": 2048/' -e 's/"intermediate_size": *[0-9]*/"intermediate_size": 8192/' \
  "$tmp/edited/train_state.json"
if [[ -n $sanitized ]]; then
  refused resume_edited_sizes "describes a model of" "$train" --resume "$tmp/edited"
else
  refused resume_edited_sizes "describes a model of" \
    bash -c 'ulimit -v 500000 && exec "$0" --resume "$1"' "$train" "$tmp/edited"
fi
rm -rf "$tmp/edited"

# A model whose weights, gradients and moments exceed the machine's memory (770 GiB here) is
# refused before anything is allocated or written, in the comparison and in --throughput alike.
refused model_beyond_memory "parameters needs at least" "$train" --hidden 65536 --layers 1024 --steps 2 --out "$tmp/huge"
check model_beyond_memory_made_no_folder test ! -e "$tmp/huge"
refused throughput_beyond_memory "parameters needs at least" "$train" --hidden 65536 --layers 1024 --throughput

# A text comparison started with a relative --text, resumed from another working folder; with
# one seed the results show no "± 0.0000" spread.
mkdir -p "$tmp/work"
for _ in $(seq 40); do echo "the quick brown fox jumps over the lazy dog, again and again"; done > "$tmp/work/corpus.txt"
succeeds text_comparison bash -c 'cd "$0/work" && exec "$1" --task text --text corpus.txt --steps 3 \
  --hidden 16 --layers 1 --heads 2 --kv-heads 1 --head-dim 8 --intermediate 32 --batch 2 --seq-len 16 \
  --seeds 1 --out "$0/text"' "$tmp" "$train"
check text_path_stored_absolute grep -qF "\"$tmp/work/corpus.txt\"" "$tmp/text/comparison.json"
succeeds text_resumed_elsewhere bash -c 'cd / && exec "$0" --resume "$1" --steps 5' "$train" "$tmp/text"
check text_resumed_to_five test "$(state_step "$tmp/text/gqe-seed0")" = 5
check one_seed_shows_no_spread bash -c 'test -s "$0" && ! grep -q "±" "$0"' "$tmp/text/results.md"
check one_seed_results_written grep -q "one run each" "$tmp/text/results.md"

echo "$cases checks, $failures failed"
[[ $failures == 0 ]]
