# shellcheck shell=bash
# Helpers shared by launch/tpu_pod.sh and launch/xpk_gke.sh; sourced, not run. Kept to bash 3.2 (macOS's /bin/bash),
# since these two run on a workstation: no namerefs, and an array that may be empty is expanded as ${a[@]+"${a[@]}"}.
#
#   DRY_RUN=1   every command that would reach a cloud (gcloud, xpk, kubectl, docker) is printed instead of run:
#               one line per command, each word shell-quoted (printf %q), so the line can be pasted into a shell.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# require NAME WHAT: stop, naming the variable, when $NAME is unset or empty.
require() {
  [[ -n "${!1:-}" ]] || die "set $1 ($2)"
}

# quote_words WORD...: the words as one shell-quoted line (printf %q each, space-separated; nothing for none).
quote_words() {
  (($#)) || return 0
  local line
  printf -v line ' %q' "$@"
  printf '%s' "${line:1}"
}

# readable_words WORD...: the words as one shell line for people: a word with characters the shell treats
# specially is put in single quotes (as Python's shlex.quote does), the rest are left bare.
readable_words() {
  local word line="" q="'"
  for word in "$@"; do
    if [[ -n "$word" && "$word" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      line+=" $word"
    else
      line+=" '${word//$q/$q\\$q$q}'"
    fi
  done
  printf '%s' "${line:1}"
}

# x COMMAND ARG...: run the command, or with DRY_RUN=1 print it (shell-quoted, one line) to stdout.
x() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "$(readable_words "$@")"
  else
    "$@"
  fi
}

# pack_checkout FILE: this checkout's files as they are on disk (tracked, and untracked ones git does not ignore:
# no .venv, runs or caches) in a tar.gz. Outside git: everything but .git, .venv and __pycache__.
pack_checkout() {
  local out=$1
  [[ -f "$REPO_ROOT/pyproject.toml" && -d "$REPO_ROOT/colorjax" ]] || die "$REPO_ROOT is not a colorjax checkout"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
      cd "$REPO_ROOT" || exit
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi  # a deleted tracked file is not packed
        done |
        tar -czf "$out" --null -T -
    )
  else
    tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ -czf "$out" .
  fi
}

# preflight SLICE ARG...: compile every jitted step of the colorjax command ARG... for the TPU slice SLICE on this
# machine (--config.compile_for; memory only, no slice needed, libtpu installed here with `pip install -e '.[tpu]'`),
# so a step that does not fit stops here, naming the micro-batch that would, before a slice is reserved. PYTHON is
# the interpreter (default: this checkout's .venv, else python3); PREFLIGHT=0 skips it. Printed under DRY_RUN=1.
preflight() {
  local slice=$1 python
  shift
  if [[ "${PREFLIGHT:-1}" != 1 ]]; then return 0; fi
  python="${PYTHON:-}"
  if [[ -z "$python" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then python="$REPO_ROOT/.venv/bin/python"; else python=python3; fi
  fi
  if ! x "$python" -m colorjax.main "$@" --config.compile_for="$slice" --config.compile_estimate=False; then
    die "preflight: the command above does not compile for $slice (its message says why); fix it, or set PREFLIGHT=0"
  fi
}
