from setuptools import setup

setup(
    name="mlc_spec",
    version="0.1.0",
    description="Exact speculative decoding over TVM-compiled Llama-family models",
    python_requires=">=3.10",
    # compile/ and runtime/ live at the top of the repository but install under mlc_spec,
    # so nothing called `compile` or `runtime` lands in site-packages.
    package_dir={
        "mlc_spec": "mlc_spec",
        "mlc_spec.compile": "compile",
        "mlc_spec.compile.kernels": "compile/kernels",
        "mlc_spec.interface": "interface",
        "mlc_spec.runtime": "runtime",
    },
    packages=["mlc_spec", "mlc_spec.compile", "mlc_spec.compile.kernels", "mlc_spec.interface", "mlc_spec.runtime"],
    # cpu_attention.c: compiled into every CPU library the compiler builds
    package_data={"mlc_spec": ["default/*", "default/draft/*"], "mlc_spec.compile": ["cpu_attention.c"]},
    install_requires=[
        "apache-tvm==0.27.0.post1",
        "numpy>=2",
        "safetensors",
        "tokenizers",
        "gguf",
        "jinja2",
        "ml_dtypes",
    ],
    extras_require={
        # mlc_spec serve's HTTP stack; the tests drive it with the official openai client
        "serve": ["fastapi", "uvicorn"],
        # accelerate: transformers' GGUF loader, a reference for the K-quants kept from a file
        "test": ["pytest", "torch==2.13.0", "transformers", "accelerate", "scipy", "pyopencl", "wgpu", "fastapi",
                 "uvicorn", "openai", "httpx"],
        "train": ["torch==2.13.0", "tqdm"],
    },
    entry_points={"console_scripts": ["mlc_spec = mlc_spec.cli:main"]},
)
