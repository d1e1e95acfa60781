# Live Response for Kubernetes. `make demo` and `make test` are the two entry points.
SHELL := /bin/bash
CARGO ?= cargo
CLUSTER := e2e/cluster.sh
## The S3-compatible server the artifact store's S3 backend is tested against, built once
## into the same cache as the Go-built control plane, keyed by version.
S3S_FS_VERSION := 0.14.1
S3S_ROOT := $(or $(LR_CACHE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/liveresponse-e2e)/s3s-fs-$(S3S_FS_VERSION)
S3S_FS := $(S3S_ROOT)/bin/s3s-fs

.PHONY: s3s-fs demo-check all build crds check-crds fmt lint unit fuzz e2e test cluster-bin cluster-up cluster-down cluster-status demo demo-up demo-down prereqs bench bench-getfile bench-fleet

all: build

## Checks that the toolchains are there and says how to get what is missing.
prereqs:
	@command -v $(CARGO) >/dev/null || { echo "Rust (cargo) is missing: install it with rustup (https://rustup.rs) or apt-get install cargo"; exit 1; }
	@command -v go >/dev/null || { echo "Go is missing: the test control plane is built from Go modules. Install Go 1.26+ and put it on PATH"; exit 1; }
	@for t in openssl curl python3; do command -v $$t >/dev/null || { echo "$$t is missing: apt-get install $$t"; exit 1; }; done

build:
	$(CARGO) build --workspace --bins

## Regenerates crds/ and config/admission/commands.yaml from api/
crds:
	$(CARGO) run -q -p liveresponse-api --bin crdgen -- .

## Fails when crds/ or config/admission/commands.yaml differ from what api/ generates.
check-crds:
	$(CARGO) run -q -p liveresponse-api --bin crdgen -- --check .

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Builds (once) the s3s-fs binary the S3 backend's test runs against.
s3s-fs:
	@test -x $(S3S_FS) || $(CARGO) install s3s-fs --version $(S3S_FS_VERSION) --features binary --locked --root $(S3S_ROOT)

## Unit tests; they include the fuzz tests at LR_FUZZ_CASES cases each (a small default),
## and the artifact store's S3 backend against a real s3s-fs server.
unit: s3s-fs
	LR_S3S_FS=$(S3S_FS) $(CARGO) test --workspace --exclude liveresponse-e2e

FUZZ_CASES ?= 200000

## Only the fuzz tests (lexer and parser, agent messages at the gateway, the agent's parsers
## of host files), FUZZ_CASES cases each, optimised. Failures are kept in *.regressions files
## next to the tests and replayed first.
fuzz:
	LR_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --release -p liveresponse-api -p liveresponse-agent -p liveresponse-operator --lib fuzz::

## Builds (once) the control plane from Go modules, then runs the end-to-end tests, which
## bring it up and down themselves.
e2e: cluster-bin build s3s-fs
	LR_S3S_FS=$(S3S_FS) $(CARGO) test -p liveresponse-e2e

## `make demo`'s scripted tour on its own control plane, then proof that it left no process.
demo-check: cluster-bin build
	@state=$$PWD/e2e/.state/demo-check; \
	DEMO_SCRIPT=1 LR_STATE_DIR=$$state e2e/demo.sh </dev/null && \
	if pgrep -af "$$state"; then echo "demo-check: make demo left the processes above running"; exit 1; fi && \
	echo "demo-check: the scripted demo passed and left no process running"

test: prereqs lint check-crds unit e2e demo-check

cluster-bin: prereqs
	@$(CLUSTER) bin >/dev/null

cluster-up: prereqs
	@$(CLUSTER) up

cluster-down:
	@$(CLUSTER) down

cluster-status:
	@$(CLUSTER) status

## The local control plane, the API, namespace `demo` with live response on, the operator and
## an agent for this machine, waiting until its Device is connected. Idempotent.
demo-up: cluster-bin build
	@./target/debug/lr-stack up

## Stops exactly what demo-up started, and the control plane.
demo-down:
	@if [ -x ./target/debug/lr-stack ]; then ./target/debug/lr-stack down; else $(CLUSTER) down; fi

## The main job: the stack up, then a live response console to this machine (or, with
## DEMO_SCRIPT=1 or no terminal, a scripted tour). Stops everything it started at the end.
demo: cluster-bin build
	@e2e/demo.sh

## Benchmarks, on optimised builds; not part of `make test` (they report, they do not fail on
## a missed target). getfile first: it starts e2e/.state/bench afresh, and lr-bench's table
## includes its getfile.json.
bench: bench-getfile bench-fleet

## Round trips against the floor and OpenSSH, throughput, fan-out, and the operator with
## BENCH_AGENTS (default 10000) idle simulated agents; see BENCHMARKS.md. Results on stdout
## and in e2e/.state/bench/bench.json.
bench-fleet: cluster-bin
	$(CARGO) build --release --workspace --bins
	LR_PROFILE=release $(CARGO) run -q --release -p liveresponse-e2e --bin lr-bench

## getfile of a 750 MiB file next to scp and ssh cat on loopback (sshd from Debian's
## openssh-server, installed when missing), and the operator's RSS during it. Results on
## stdout and in e2e/.state/bench/getfile.json.
bench-getfile: cluster-bin
	$(CARGO) build --release --workspace --bins
	LR_PROFILE=release $(CARGO) run -q --release -p liveresponse-e2e --bin lr-bench-getfile
