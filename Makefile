# flowmap: the README's two commands are `make demo` (main job) and `make test` (the test suite).
# Both do all set-up on a fresh machine first (venv with torch, data with checksums, build).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup build demo test doctor bundle

setup:
	@./scripts/setup.sh

build: setup
	$(CARGO) build --release --workspace --bins

demo: build
	./scripts/demo.sh

# Formatting and lints are part of the tests: CI fails on unformatted code or any clippy warning.
test: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) test --release --workspace

doctor: build
	./target/release/flowmap doctor

# Stripped release binaries + run.sh in dist/bundle (git-ignored), for a GPU machine without network.
bundle: setup
	./scripts/bundle.sh
