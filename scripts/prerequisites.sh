# Sourced by scripts/test (so the README's test command works on a fresh machine, and CI's
# .ci/run is just that command): installs what the tests need and is missing, and exports the
# PATH and Go settings the tests run with. Packages come from apt-get (as root, or through sudo);
# cbindgen at the pinned version and the fuzz targets' pinned nightly through cargo/rustup.
# Idempotent: on a machine that has everything it only checks.

# Runs a command as root: directly when we are root, else through sudo; without either, says
# what could not be installed and stops.
as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "FATAL: installing the test prerequisites needs root or sudo: $*" >&2
    exit 1
  fi
}

CBINDGEN_VERSION=0.29.4

echo "== prerequisites (scripts/prerequisites.sh): toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null 2>&1 || { echo "FATAL: no Rust toolchain (cargo) on this machine: install rustup first" >&2; exit 1; }
fi
rustup component add rustfmt >/dev/null 2>&1 || true
cargo --version

# Go: the Go bindings' tests. Debian's golang-go may be older than bindings/go/go.mod wants;
# GOTOOLCHAIN=auto then fetches the right toolchain from the Go module proxy.
[ -x /usr/local/go/bin/go ] && export PATH="/usr/local/go/bin:$PATH"
missing=()
for tool in gcc g++ make valgrind cmake pkg-config python3 go prlimit readelf; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
# The Python bindings' tests make a venv.
if command -v python3 >/dev/null 2>&1 && ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  pkgs=()
  for t in "${missing[@]}"; do
    case "$t" in
      go) pkgs+=(golang-go) ;;
      python3) pkgs+=(python3 python3-venv) ;;
      prlimit) pkgs+=(util-linux) ;;     # the hostile-input suite caps each process with it
      readelf) pkgs+=(binutils) ;;
      *) pkgs+=("$t") ;;
    esac
  done
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
fi
export GOTOOLCHAIN=auto

# AddressSanitizer and UBSan runtimes for scripts/test-c: Debian's gcc pulls them in through
# libgcc-N-dev, but a trimmed image may lack them; a link test says.
if ! echo 'int main(void){return 0;}' | gcc -x c -fsanitize=address,undefined -o /dev/null - >/dev/null 2>&1; then
  gcc_major=$(gcc -dumpversion | cut -d. -f1)
  echo "installing the sanitizer runtimes for gcc $gcc_major"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "libgcc-$gcc_major-dev"
fi

# The pinned nightly of the fuzz targets (scripts/fuzz).
if ! scripts/fuzz --check-toolchain; then
  nightly=$(scripts/fuzz --pinned)
  echo "installing $nightly (fuzz targets)"
  rustup toolchain install "$nightly" --profile minimal
fi

if ! cbindgen --version 2>/dev/null | grep -q "$CBINDGEN_VERSION"; then
  echo "installing cbindgen $CBINDGEN_VERSION"
  cargo install cbindgen --version "$CBINDGEN_VERSION" --locked
fi
cbindgen --version

