#!/bin/sh
# Keep $GIT_SYNC_DIR (default /repo) at the tip of $GIT_BRANCH of $GIT_URL, updating files in place so
# `reconciler watch` sees them change. Untracked files (.reconciler/ with its backups) are left alone.
# Usage: git-sync.sh once | git-sync.sh loop   (loop: every $SYNC_INTERVAL seconds, default 60)
#
# In a pod the folder is an emptyDir volume: owned by root, group-writable through fsGroup, while this
# runs as an unprivileged uid. git refuses a work tree another user owns ("detected dubious ownership"),
# so every git command here trusts this one folder (safe.directory; the pod's other containers are given
# the same setting through GIT_CONFIG_* variables in the manifests).
set -eu
repo=${GIT_SYNC_DIR:-/repo}
: "${GIT_URL:?GIT_URL is not set (the Secret reconciler-git, key url)}"
: "${GIT_BRANCH:=main}"
git() {
  command git -c safe.directory="$repo" -C "$repo" "$@"
}
git init -q
git remote get-url origin >/dev/null 2>&1 || git remote add origin "$GIT_URL"
git remote set-url origin "$GIT_URL"
pull() {
  git fetch -q --depth=1 origin "$GIT_BRANCH" && git checkout -q -f FETCH_HEAD
}
pull
if [ "${1:-once}" = loop ]; then
  while sleep "${SYNC_INTERVAL:-60}"; do
    pull || echo "git-sync: fetching $GIT_BRANCH failed; trying again in ${SYNC_INTERVAL:-60}s" >&2
  done
fi
