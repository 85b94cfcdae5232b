"""recbole-cdsr: cross-domain sequential recommendation (with LLMs) on RecBole."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy exports: importing the package stays cheap (no RecBole import until needed).
    if name in ("run_recbole_cdsr",):
        from recbole_cdsr.quick_start import run_recbole_cdsr

        return run_recbole_cdsr
    if name == "CDSRConfig":
        from recbole_cdsr.config import CDSRConfig

        return CDSRConfig
    raise AttributeError(name)
