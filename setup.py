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
        "test": ["pytest", "scipy"],
        "examples": ["scikit-learn"],
        "scipy": ["scipy"],
    },
)
