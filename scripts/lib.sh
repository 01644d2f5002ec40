# Shared set-up for scripts/demo and scripts/test. Sourced, not run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# Go: the machine's Go (>= 1.21) fetches the toolchain go.mod names
# through the module proxy if it is older.
for d in /usr/local/go/bin "$HOME/go/bin"; do
  case ":$PATH:" in *":$d:"*) ;; *) [ -d "$d" ] && PATH="$PATH:$d" ;; esac
done
export PATH
if ! command -v go >/dev/null; then
  echo "remusd: Go is not installed; install Go >= 1.21 (https://go.dev/doc/install) and re-run" >&2
  exit 1
fi
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
GOBIN_DIR=$(go env GOPATH)/bin
PATH="$PATH:$GOBIN_DIR"

apt_install() { # apt_install PKG... : install missing Debian packages
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "remusd: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

build_remusd() {
  go mod download
  mkdir -p bin
  go build -o bin/remusd ./cmd/remusd
}
