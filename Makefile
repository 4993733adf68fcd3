# agentbridge — the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test test-unit services bench lint fmt check clean

## run: the whole pipeline on the embedded default (in-memory bus and store, SQLite ledger,
## agent simulator, fake vendor APIs), on the sample events in deploy/samples: no servers needed
run:
	$(CARGO) run --quiet --bin agentbridge -- self-check
	$(CARGO) run --quiet --bin agentbridge -- dev

## test: everything, against real Redis, RabbitMQ, PostgreSQL and the Tansu Kafka broker
test: services
	$(CARGO) test --workspace --lib --bins --tests --no-fail-fast
	scripts/helm-check.sh

## test-unit: unit tests only (no servers)
test-unit:
	$(CARGO) test --workspace --lib --bins

## services: start whatever test servers are not running (idempotent)
services:
	scripts/dev-services.sh

## bench: the benchmark suite, each figure beside its raw baseline (see BENCHMARKS.md)
bench: services
	$(CARGO) bench --bench transport --bench store --bench normalize --bench normalizer_kafka --bench callbacks --bench trigger --bench metering

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

check:
	$(CARGO) check --workspace --all-targets

clean:
	$(CARGO) clean
