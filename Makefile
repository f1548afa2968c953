# Developer shortcuts; each target is one command a user can also type.
.PHONY: help simulate test test-rust test-bindings bench lint fmt

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

simulate: ## build and run the multi-agent simulation on the embedded engine
	cargo run --release -q -p ratewarden-cli -- simulate

test: ## build everything and run every test (Rust, Python, Node)
	scripts/test-all.sh

test-rust: ## Rust tests only
	cargo test --workspace

test-bindings: ## build the Python and Node bindings and run their tests
	scripts/test-bindings.sh

lint: ## rustfmt check and clippy with warnings as errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## format the Rust code
	cargo fmt --all

bench: ## criterion benchmarks of the embedded engine (with governor) and memory per key
	cargo bench -p ratewarden --bench engine
	cargo bench -p ratewarden --bench memory
