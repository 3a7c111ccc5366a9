#!/bin/sh
# Keep /repo at the tip of $GIT_BRANCH of $GIT_URL, updating files in place so `reconciler watch`
# sees them change. Untracked files (.reconciler/ with its backups) are left alone.
# Usage: git-sync.sh once | git-sync.sh loop   (loop: every $SYNC_INTERVAL seconds, default 60)
set -eu
repo=/repo
git init -q "$repo"
git -C "$repo" remote get-url origin >/dev/null 2>&1 || git -C "$repo" remote add origin "$GIT_URL"
pull() {
  git -C "$repo" fetch -q --depth=1 origin "$GIT_BRANCH" && git -C "$repo" checkout -q -f FETCH_HEAD
}
pull
if [ "${1:-once}" = loop ]; then
  while sleep "${SYNC_INTERVAL:-60}"; do
    pull || echo "git-sync: fetching $GIT_BRANCH failed; trying again in ${SYNC_INTERVAL:-60}s" >&2
  done
fi
