#!/usr/bin/env bash
# Install p2prc from this checkout into ./.venv and put the `p2prc` command on PATH.
#   ./install.sh         the node and CLI
#   ./install.sh --dev   also the test and lint tools
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: p2prc needs Python 3.11 or newer as '$python' (set PYTHON=...)" >&2
    exit 1
fi
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    as_root apt-get update -qq
    as_root apt-get install -y -qq "python${version}-venv" || as_root apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"

if [ "$(id -u)" = 0 ]; then bindir=/usr/local/bin; else bindir="$HOME/.local/bin"; fi
mkdir -p "$bindir"
ln -sf "$PWD/.venv/bin/p2prc" "$bindir/p2prc"
case ":$PATH:" in
    *":$bindir:"*) echo "p2prc installed: $(command -v p2prc)" ;;
    *) echo "p2prc installed in $bindir; add it to PATH (or run $bindir/p2prc)" ;;
esac
