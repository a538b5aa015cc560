# libbeit: build and install the C library (and the C++ header).
#
#   make                          cargo build --release --locked
#   make install PREFIX=/opt/beit [DESTDIR=/staging]
#   make uninstall PREFIX=/opt/beit
#
# Installs, under PREFIX:
#   lib/libbeit.so.$(VERSION)     SONAME libbeit.so.$(ABI) (set by build.rs from BEIT_ABI_VERSION)
#   lib/libbeit.so.$(ABI) -> libbeit.so.$(VERSION),  lib/libbeit.so -> libbeit.so.$(ABI)
#   lib/libbeit.a
#   bin/beit                      the command-line tool
#   include/beit.h, include/beit.hpp
#   lib/pkgconfig/beit.pc
#   lib/cmake/beit/beitConfig.cmake, beitConfigVersion.cmake   (imported target beit::beit)
#
# beit.pc's Libs carry `-Wl,-rpath,${libdir}` (PC_RPATH), so a program linked through pkg-config
# (C, C++, Go's `#cgo pkg-config: beit`) finds libbeit.so.$(ABI) at run time without
# LD_LIBRARY_PATH. A distribution package installing into a directory the loader already searches
# may drop it: `make install PREFIX=/usr PC_RPATH=`.
PREFIX ?= /usr/local
DESTDIR ?=
CARGO ?= cargo
PC_RPATH ?= -Wl,-rpath,$${libdir}

VERSION := $(shell sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
ABI := $(shell sed -n 's/^pub const BEIT_ABI_VERSION: u32 = \([0-9][0-9]*\);/\1/p' src/ffi/version.rs)
MAJOR := $(word 1,$(subst ., ,$(VERSION)))
MINOR := $(word 2,$(subst ., ,$(VERSION)))

LIB := $(DESTDIR)$(PREFIX)/lib
BIN := $(DESTDIR)$(PREFIX)/bin
INC := $(DESTDIR)$(PREFIX)/include
SUBST := sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' -e 's|@ABI@|$(ABI)|g' \
	-e 's|@MAJOR@|$(MAJOR)|g' -e 's|@MINOR@|$(MINOR)|g' \
	-e 's|@PC_RPATH@|$(PC_RPATH)|g'

.PHONY: all build install uninstall check-vars
all: build

check-vars:
	@test -n "$(VERSION)" || { echo "Makefile: cannot read the version from Cargo.toml" >&2; exit 1; }
	@test -n "$(ABI)" || { echo "Makefile: cannot read BEIT_ABI_VERSION from src/ffi/version.rs" >&2; exit 1; }

build: check-vars
	$(CARGO) build --release --locked

install: build
	@soname=$$(readelf -d target/release/libbeit.so | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p'); \
	test "$$soname" = "libbeit.so.$(ABI)" || { echo "Makefile: target/release/libbeit.so has SONAME '$$soname', want libbeit.so.$(ABI)" >&2; exit 1; }
	install -d $(LIB) $(INC) $(BIN) $(LIB)/pkgconfig $(LIB)/cmake/beit
	install -m 755 target/release/beit $(BIN)/beit
	install -m 755 target/release/libbeit.so $(LIB)/libbeit.so.$(VERSION)
	ln -sfn libbeit.so.$(VERSION) $(LIB)/libbeit.so.$(ABI)
	ln -sfn libbeit.so.$(ABI) $(LIB)/libbeit.so
	install -m 644 target/release/libbeit.a $(LIB)/libbeit.a
	install -m 644 include/beit.h $(INC)/beit.h
	install -m 644 bindings/cpp/beit.hpp $(INC)/beit.hpp
	$(SUBST) bindings/cpp/install/beit.pc.in > $(LIB)/pkgconfig/beit.pc
	$(SUBST) bindings/cpp/install/beitConfig.cmake.in > $(LIB)/cmake/beit/beitConfig.cmake
	$(SUBST) bindings/cpp/install/beitConfigVersion.cmake.in > $(LIB)/cmake/beit/beitConfigVersion.cmake

uninstall: check-vars
	rm -f $(LIB)/libbeit.so.$(VERSION) $(LIB)/libbeit.so.$(ABI) $(LIB)/libbeit.so $(LIB)/libbeit.a $(BIN)/beit
	rm -f $(INC)/beit.h $(INC)/beit.hpp $(LIB)/pkgconfig/beit.pc
	rm -f $(LIB)/cmake/beit/beitConfig.cmake $(LIB)/cmake/beit/beitConfigVersion.cmake
	-rmdir $(LIB)/cmake/beit 2>/dev/null
