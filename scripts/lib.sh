# Shared by scripts/server and scripts/test: make sure what a command needs is installed.
# Debian 12 (or newer) as root, or with sudo.

# What building and running `tugboat server` (or agent) needs; scripts/server says why each.
SERVER_PACKAGES="gcc binutils libc6-dev libseccomp-dev iproute2 nftables iptables kmod ca-certificates util-linux"

die() { echo "error: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root to run: $*"
  fi
}

# ensure_packages PKG...: installs the Debian packages that are missing (apt-get update once).
ensure_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing packages ${missing[*]} and no apt-get to install them"
  echo "installing ${missing[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# need_cargo: a Rust toolchain >= 1.89. Uses rustup's or any cargo on PATH; on a machine with
# none, installs Debian 12's own recent toolchain (cargo-web/rustc-web, 1.9x).
need_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    ensure_packages cargo-web
  fi
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (stable >= 1.89) and run again"
  local version minor
  version=$(rustc --version 2>/dev/null | awk '{print $2}')
  minor=$(echo "$version" | cut -d. -f2)
  if [ "$(echo "$version" | cut -d. -f1)" != 1 ] || [ "${minor:-0}" -lt 89 ]; then
    die "rustc ${version:-?} is too old: Tugboat needs 1.89 or newer"
  fi
}
