from setuptools import find_packages, setup

setup(
    name="nngeometry",
    version="0.4.0",
    description="Fisher, Gauss-Newton and related matrices of PyTorch models in structured "
                "representations, with linear algebra on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["nngeometry", "nngeometry.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "numpy", "opt_einsum", "tqdm"],
    extras_require={
        # the examples, the docs site, scipy interop and a GPT-2 built from a config are
        # exercised by the suite
        "test": ["pytest", "scipy", "transformers", "scikit-learn", "matplotlib", "mkdocs>=1.6",
                 "mkdocstrings[python]>=0.25"],
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.25"],
        "examples": ["scikit-learn", "matplotlib"],
        "scipy": ["scipy"],
        # benchmarks/peers.py: the peers it compares against (BackPACK needs a torchvision
        # that matches torch: a separate environment is often simpler, see the script)
        "bench": ["curvlinops-for-pytorch", "backpack-for-pytorch"],
    },
)
