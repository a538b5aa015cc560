//go:build beit_intree

package beit

// With `-tags beit_intree` the package builds against this checkout rather than an installed
// libbeit: the header in include/ and the libbeit.so that `cargo build --release` leaves in
// target/release (beside its SONAME link, libbeit.so.<ABI>, which build.rs makes). The rpath
// lets the test binaries and examples run without LD_LIBRARY_PATH. bindings/go/test.sh builds
// this way.

// #cgo CFLAGS: -I${SRCDIR}/../../include
// #cgo LDFLAGS: -L${SRCDIR}/../../target/release -Wl,-rpath,${SRCDIR}/../../target/release -lbeit
import "C"
