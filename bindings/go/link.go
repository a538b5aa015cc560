//go:build !beit_intree

package beit

// By default the package builds against an installed libbeit found through pkg-config: `make
// install PREFIX=...` in a libbeit checkout installs lib/pkgconfig/beit.pc, whose Cflags name
// the include directory and whose Libs name the library and an rpath to it (so programs find
// libbeit.so.<ABI> at run time without LD_LIBRARY_PATH). Point pkg-config at it with
//
//	PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig go build
//
// Inside the libbeit checkout, build with `-tags beit_intree` instead (link_intree.go): the
// header from include/ and the library from target/release (see README.md).

// #cgo pkg-config: beit
import "C"
