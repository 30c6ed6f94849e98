#!/usr/bin/env bash
# The web UI's third-party code (crates/server/ui/vendor/), fetched from npm at pinned versions:
# Preact (the view library, with its hooks) and htm (JSX-like tagged templates, so the UI needs
# no build step). `npm pack` checks each tarball against the registry's integrity hash. The one
# change made to the files: hooks.mjs imports Preact by a relative path instead of the bare name
# "preact", so the browser needs no import map.
#
#   scripts/vendor_ui.sh           rewrite crates/server/ui/vendor/
#   scripts/vendor_ui.sh --check   fail if the committed files differ from what npm serves
set -euo pipefail
cd "$(dirname "$0")/.."
PREACT=11.2.0
HTM=3.1.1
out=crates/server/ui/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "preact@$PREACT" "htm@$HTM" >/dev/null)
mkdir -p "$tmp/preact" "$tmp/htm" "$tmp/vendor"
tar xzf "$tmp/preact-$PREACT.tgz" -C "$tmp/preact"
tar xzf "$tmp/htm-$HTM.tgz" -C "$tmp/htm"
cp "$tmp/preact/package/dist/preact.mjs" "$tmp/vendor/preact.mjs"
sed 's|from"preact"|from"./preact.mjs"|' "$tmp/preact/package/hooks/dist/hooks.mjs" >"$tmp/vendor/hooks.mjs"
cp "$tmp/htm/package/dist/htm.mjs" "$tmp/vendor/htm.mjs"
cp "$tmp/preact/package/LICENSE" "$tmp/vendor/LICENSE-preact"
cp "$tmp/htm/package/LICENSE" "$tmp/vendor/LICENSE-htm"
grep -q 'from"./preact.mjs"' "$tmp/vendor/hooks.mjs" || { echo "hooks.mjs no longer imports \"preact\": update this script" >&2; exit 1; }
if [ "${1:-}" = "--check" ]; then
    if ! diff -r "$tmp/vendor" "$out" --exclude=README.md; then
        echo "$out differs from preact@$PREACT / htm@$HTM on npm: run scripts/vendor_ui.sh" >&2
        exit 1
    fi
else
    mkdir -p "$out"
    cp "$tmp"/vendor/* "$out/"
fi
