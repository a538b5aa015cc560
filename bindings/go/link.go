//go:build !beit_external

package beit

// By default the package builds against this checkout: the header in include/ and the
// libbeit.so that `cargo build --release` leaves in target/release. Build with
// `-tags beit_external` to drop these paths and supply your own through CGO_CFLAGS and
// CGO_LDFLAGS (or pkg-config), e.g.
//
//	CGO_CFLAGS=-I/opt/beit/include CGO_LDFLAGS="-L/opt/beit/lib -lbeit" go build -tags beit_external
//
// At run time the dynamic loader must find libbeit.so (LD_LIBRARY_PATH, an rpath, or a
// system library directory).

// #cgo CFLAGS: -I${SRCDIR}/../../include
// #cgo LDFLAGS: -L${SRCDIR}/../../target/release -lbeit
import "C"
