# Assertions shared by the fault scripts (sourced, not run). The caller sets tmp (a scratch folder)
# and may set check_timeout (seconds a command may take, default 60); failures and cases count up.
failures=0 cases=0
fail() { echo "FAIL $1: $2"; failures=$((failures + 1)); }
ok() { echo "ok   $1"; }

# refused NAME SUBSTRING CMD...: exit 2, one line on stderr holding SUBSTRING.
refused() {
  local name=$1 says=$2
  shift 2
  cases=$((cases + 1))
  timeout "${check_timeout:-60}" "$@" > "$tmp/stdout" 2> "$tmp/stderr"
  local status=$? lines
  lines=$(wc -l < "$tmp/stderr")
  if [[ $status != 2 ]]; then fail "$name" "exit status $status, expected 2; stderr: $(head -c 300 "$tmp/stderr")"; return 1; fi
  if [[ $lines != 1 ]]; then fail "$name" "$lines lines on stderr, expected 1: $(head -c 300 "$tmp/stderr")"; return 1; fi
  if ! grep -qF -- "$says" "$tmp/stderr"; then fail "$name" "stderr lacks '$says': $(cat "$tmp/stderr")"; return 1; fi
  ok "$name: $(cat "$tmp/stderr")"
}

# succeeds NAME CMD...: exit 0.
succeeds() {
  local name=$1
  shift
  cases=$((cases + 1))
  timeout "${check_timeout:-60}" "$@" > "$tmp/stdout" 2> "$tmp/stderr"
  local status=$?
  if [[ $status != 0 ]]; then fail "$name" "exit status $status, expected 0; stderr: $(tail -c 300 "$tmp/stderr")"; return 1; fi
  ok "$name"
}

# check NAME CONDITION-CMD...: one more assertion.
check() {
  local name=$1
  shift
  cases=$((cases + 1))
  if "$@"; then ok "$name"; else fail "$name" "condition failed: $*"; fi
}

# A script for `bash -c "$closed_pipe" SCRATCH CMD...`: runs CMD with its stdout a pipe whose reading
# end is already closed (the reader closes it, then lets CMD start), and exits with CMD's status.
closed_pipe='gate=$0/gate; mkfifo "$gate" || exit 1
{ read -r < "$gate"; exec "$@"; } | { exec 0<&-; echo > "$gate"; }
status=${PIPESTATUS[0]}; rm -f "$gate"; exit "$status"'
