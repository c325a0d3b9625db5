"""pkmodel: population pharmacokinetics and model-informed precision dosing.

Layers, from the bottom: :mod:`pkmodel.errors`, :mod:`pkmodel.data` (NONMEM-style event
tables and regimens), :mod:`pkmodel.engine` (exact linear-compartment solutions),
:mod:`pkmodel.model` and :mod:`pkmodel.models` (population models, published ones),
:mod:`pkmodel.predict` (prediction, simulation), :mod:`pkmodel.estimate` (MAP and
posterior) beside :mod:`pkmodel.saem` (SAEM, importance sampling) and
:mod:`pkmodel.population` (FOCE-I, FOCE, FO and SAEM population estimation),
:mod:`pkmodel.dosing` (the infliximab recommendation and its dose optimisation) beside
:mod:`pkmodel.target` (dosing questions for any drug, in the model's units) and
:mod:`pkmodel.averaging` (several models for one patient), :mod:`pkmodel.trial` (virtual
trials), :mod:`pkmodel.plot` and :mod:`pkmodel.report` (figures, the patient report),
:mod:`pkmodel.cli` (the ``pkmodel`` command). Units are the model's (``time_unit``,
``dose_unit``, ``concentration_unit``): day, mg, L, L/day, mg/L for the infliximab models.

Examples
--------
>>> import pkmodel
>>> table = pkmodel.infliximab_regimen(28.0, covariates={"ALB": 3.3, "ATI": 0, "IMM": 1})
>>> troughs = pkmodel.predict_troughs(pkmodel.load_model("fasanmade2011"), table)
>>> round(float(troughs["PRED"].iloc[-1]), 2)   # week-46 trough on label dosing, mg/L
1.19
"""

import sys
import types

__version__ = "0.1.0"

#: Every name is loaded on first use (PEP 562), so that ``import pkmodel`` costs nothing
#: (numpy, pandas, sympy and scipy load with the first name that needs them) and the
#: command loads only what it runs.
_LAZY = {
    "dosing_table": "pkmodel.data", "from_clinical": "pkmodel.data",
    "infliximab_regimen": "pkmodel.data", "read_nonmem": "pkmodel.data",
    "validate": "pkmodel.data",
    "Recommendation": "pkmodel.dosing", "dose_for_target_trough": "pkmodel.dosing",
    "interval_for_target_trough": "pkmodel.dosing", "recommend_regimen": "pkmodel.dosing",
    "time_to_trough": "pkmodel.dosing",
    "ConvergenceError": "pkmodel.errors", "ConvergenceWarning": "pkmodel.errors",
    "CovariateError": "pkmodel.errors", "CovariateWarning": "pkmodel.errors",
    "DatasetError": "pkmodel.errors", "PKModelError": "pkmodel.errors",
    "estimate_map": "pkmodel.estimate", "sample_posterior": "pkmodel.estimate",
    "PopulationModel": "pkmodel.model",
    "make_cohort": "pkmodel.predict", "predict": "pkmodel.predict",
    "predict_troughs": "pkmodel.predict", "simulate": "pkmodel.predict",
    "plot_prior_posterior": "pkmodel.plot", "plot_profile": "pkmodel.plot",
    "plot_recommendation": "pkmodel.plot", "plot_goodness_of_fit": "pkmodel.plot",
    "plot_vpc": "pkmodel.plot", "plot_eta_covariates": "pkmodel.plot",
    "NewDoses": "pkmodel.target", "Target": "pkmodel.target",
    "dose_for_target": "pkmodel.target", "exposure": "pkmodel.target",
    "interval_for_target": "pkmodel.target", "time_to_concentration": "pkmodel.target",
    "BayesianDosing": "pkmodel.trial", "KangProactive": "pkmodel.trial",
    "LabelDosing": "pkmodel.trial", "kang_cohort": "pkmodel.trial",
    "run_trial": "pkmodel.trial",
    "estimate_population": "pkmodel.population", "population_objective": "pkmodel.population",
    "npde": "pkmodel.population", "eta_covariates": "pkmodel.population",
    "SAEMOptions": "pkmodel.saem", "importance_sampling": "pkmodel.saem",
    "compare_models": "pkmodel.averaging", "recommend_with_models": "pkmodel.averaging",
    "forecast_averaged": "pkmodel.averaging", "recommend_averaged": "pkmodel.dosing",
}


#: Top-level names that differ from their module's.
_RENAMED = {"available_models": ("pkmodel.models", "available"),
            "load_model": ("pkmodel.models", "load")}


def __getattr__(name: str) -> object:
    if name in _LAZY or name in _RENAMED:
        import importlib

        module, attribute = _RENAMED.get(name, (_LAZY.get(name), name))
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pkmodel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package, whose lazy names stay what they name: importing a submodule of the
    same name (``pkmodel.predict``, the module, by any caller) would otherwise rebind
    ``pkmodel.predict``, the function, to it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules, under its full name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "BayesianDosing",
    "ConvergenceError",
    "ConvergenceWarning",
    "CovariateError",
    "CovariateWarning",
    "DatasetError",
    "KangProactive",
    "LabelDosing",
    "NewDoses",
    "PKModelError",
    "PopulationModel",
    "Recommendation",
    "SAEMOptions",
    "Target",
    "available_models",
    "compare_models",
    "dose_for_target",
    "dose_for_target_trough",
    "dosing_table",
    "estimate_map",
    "estimate_population",
    "eta_covariates",
    "exposure",
    "forecast_averaged",
    "from_clinical",
    "importance_sampling",
    "infliximab_regimen",
    "interval_for_target",
    "interval_for_target_trough",
    "kang_cohort",
    "load_model",
    "make_cohort",
    "npde",
    "plot_eta_covariates",
    "plot_goodness_of_fit",
    "plot_prior_posterior",
    "plot_profile",
    "plot_recommendation",
    "plot_vpc",
    "population_objective",
    "predict",
    "predict_troughs",
    "read_nonmem",
    "recommend_averaged",
    "recommend_regimen",
    "recommend_with_models",
    "run_trial",
    "sample_posterior",
    "simulate",
    "time_to_concentration",
    "time_to_trough",
    "validate",
]
