"""Published infliximab population PK models.

Units: day, mg, L, L/day, mg/L. Infusions last 2 h. IIV is exponential
(``P = TV * exp(ETA)``) and OMEGA holds variances; residual SDs as published
(``Y = F * (1 + EPS_prop) + EPS_add``). Every number is cited next to it; the source
summaries are in shared/reference/infliximab_models.md, whose provenance is the published
paper where it could be read, otherwise the NONMEM control streams of Kim et al. 2025 (CPT
Pharmacometrics Syst Pharmacol 14:1682, doi:10.1002/psp4.70089, Data S1).
"""

from __future__ import annotations

import sympy as sp

from pkmodel.engine import Structure
from pkmodel.model import Covariate, DosingLabel, PopulationModel, ResidualError, as_omega

__all__ = ["INFLIXIMAB_LABEL", "MODELS"]

#: Infliximab label (Remicade SmPC/USPI; shared/reference/dosing_and_targets.md): 5 mg/kg
#: as 2-h IV infusions at weeks 0, 2 and 6, then every 8 weeks; 100-mg vials; escalation
#: in practice up to 10 mg/kg or every 4 weeks (beyond that: above the label).
INFLIXIMAB_LABEL = DosingLabel(
    drug="infliximab",
    dose_mg_per_kg=5.0,
    max_mg_per_kg=10.0,
    min_interval_weeks=4.0,
    maintenance_interval_weeks=8.0,
    induction_weeks=(0.0, 2.0, 6.0),
    vial_mg=100.0,
    infusion_hours=2.0,
    source="Remicade label (SmPC/USPI); shared/reference/dosing_and_targets.md",
)

WT, ALB, ATI, IMM, FEMALE, MALE, CRP, CD, UC, AGE = sp.symbols(
    "WT ALB ATI IMM FEMALE MALE CRP CD UC AGE"
)
ETA_CL, ETA_V1, ETA_Q, ETA_V2, KAPPA_CL = sp.symbols("ETA_CL ETA_V1 ETA_Q ETA_V2 KAPPA_CL")
ETA_V = sp.Symbol("ETA_V")


def _t(name: str) -> sp.Symbol:
    return sp.Symbol(name)


def _rel(covariate: sp.Symbol, reference: float) -> sp.Expr:
    """``covariate / reference``, kept unevaluated so equations print as published."""
    ref = sp.Float(reference) if isinstance(reference, float) else sp.Integer(reference)
    return sp.UnevaluatedExpr(sp.Mul(covariate, sp.Pow(ref, -1, evaluate=False),
                                     evaluate=False))


def _weight(reference: float | None, observed: tuple[float, float] | None = None) -> Covariate:
    return Covariate("WT", "kg", "body weight", plausible=(1.0, 250.0), observed=observed,
                     reference=reference,
                     hint="Weight must be in kg: 0, negative, or above 250 cannot be kg.")


def _albumin_g_dl(reference: float | None,
                  observed: tuple[float, float] | None = None) -> Covariate:
    return Covariate("ALB", "g/dL", "serum albumin", plausible=(1.0, 6.5), observed=observed,
                     reference=reference,
                     hint="This model expects g/dL (healthy 3.5-5.0); a value near 35 is "
                          "probably g/L: divide by 10.")


def _indicator(name: str, description: str, reference: float | None = 0.0) -> Covariate:
    return Covariate(name, "0/1", description, plausible=(0.0, 1.0), reference=reference)


_ATI = _indicator("ATI", "antibodies to infliximab (1 present)")
_IMM = _indicator("IMM", "concomitant immunomodulator (1 yes)")

# --------------------------------------------------------------------------------------
# A. Fasanmade AA et al. Clin Ther 2011;33(7):946-964, doi:10.1016/j.clinthera.2011.06.002.
# REACH + ACCENT I, n = 692 (112 children, 580 adults), age 6-76 y, median WT 65 kg,
# median ALB 4.1 g/dL. Per-kg parameterisation, total = per-kg value * WT / 1000.
# Weight exponents are negative on the per-kg scale (they reproduce Frymoyer 2016).
FASANMADE2011 = PopulationModel(
    name="fasanmade2011",
    structure=Structure(2),
    theta={
        "CL_KG": 5.42,  # mL/kg/day (Fasanmade 2011, combined model)
        "CL_WT": -0.313,
        "CL_ALB": -0.855,
        "CL_ATI": 0.291,
        "CL_IMM": -0.137,
        "V1_KG": 52.4,  # mL/kg
        "V1_WT": -0.233,
        "V2_KG": 19.6,  # mL/kg
        "V2_WT": -0.588,
        "Q_KG": 2.26,  # mL/kg/day
    },
    parameters={
        "CL": _t("CL_KG") * _rel(WT, 65) ** _t("CL_WT") * _rel(ALB, 4.1) ** _t("CL_ALB")
        * (1 + _t("CL_ATI") * ATI) * (1 + _t("CL_IMM") * IMM) * WT / 1000
        * sp.exp(ETA_CL + KAPPA_CL),
        "V1": _t("V1_KG") * _rel(WT, 65) ** _t("V1_WT") * WT / 1000 * sp.exp(ETA_V1),
        "Q": _t("Q_KG") * WT / 1000,
        "V2": _t("V2_KG") * _rel(WT, 65) ** _t("V2_WT") * WT / 1000 * sp.exp(ETA_V2),
    },
    omega=as_omega([0.0942, 0.0159, 0.306]),  # IIV variances CL, V1, V2 (Fasanmade 2011)
    eta_names=("ETA_CL", "ETA_V1", "ETA_V2"),
    iov={"KAPPA_CL": 0.0335},  # IOV variance on CL (Fasanmade 2011)
    residual=ResidualError(proportional=0.292, additive=0.371),  # SDs (Fasanmade 2011)
    covariates=(_weight(65.0), _albumin_g_dl(4.1), _ATI, _IMM),
    citation="Fasanmade AA et al. Clin Ther 2011;33(7):946-964. "
             "doi:10.1016/j.clinthera.2011.06.002 (combined model)",
    description="Children and adults with Crohn's disease (REACH + ACCENT I, n = 692, "
                "age 6-76 y, median 65 kg, median albumin 4.1 g/dL). pkmodel's default "
                "infliximab model.",
    label=INFLIXIMAB_LABEL,
)

# --------------------------------------------------------------------------------------
# B. Fasanmade 2011 (same paper), children only: REACH, n = 112, median 42 kg, median
# ALB 3.8 g/dL, all on an immunomodulator (so no IMM term).
FASANMADE2011_PEDIATRIC = PopulationModel(
    name="fasanmade2011_pediatric",
    structure=Structure(2),
    theta={
        "CL_KG": 5.43,  # mL/kg/day (Fasanmade 2011, pediatric model)
        "CL_WT": -0.34,
        "CL_ALB": -1.22,
        "V1_KG": 54.2,  # mL/kg
        "V1_WT": -0.171,
        "V2_KG": 29.2,  # mL/kg
        "V2_WT": -0.414,
        "Q_KG": 3.52,  # mL/kg/day
    },
    parameters={
        "CL": _t("CL_KG") * _rel(WT, 42) ** _t("CL_WT") * _rel(ALB, 3.8) ** _t("CL_ALB") * WT / 1000
        * sp.exp(ETA_CL + KAPPA_CL),
        "V1": _t("V1_KG") * _rel(WT, 42) ** _t("V1_WT") * WT / 1000 * sp.exp(ETA_V1),
        "Q": _t("Q_KG") * WT / 1000,
        "V2": _t("V2_KG") * _rel(WT, 42) ** _t("V2_WT") * WT / 1000 * sp.exp(ETA_V2),
    },
    omega=as_omega([0.064, 0.027, 0.122]),  # IIV variances CL, V1, V2 (Fasanmade 2011)
    eta_names=("ETA_CL", "ETA_V1", "ETA_V2"),
    iov={"KAPPA_CL": 0.048},  # IOV variance on CL (Fasanmade 2011, pediatric)
    residual=ResidualError(proportional=0.275, additive=0.244),  # SDs (Fasanmade 2011)
    covariates=(_weight(42.0), _albumin_g_dl(3.8)),
    citation=FASANMADE2011.citation,
    description="Children 6-17 y with Crohn's disease (REACH, n = 112, median 42 kg, "
                "median albumin 3.8 g/dL, all on an immunomodulator).",
    label=INFLIXIMAB_LABEL,
)

# --------------------------------------------------------------------------------------
# C. Xu/Mould 2012 pooled model (CD 112 + UC 543, median 70 kg, ALB 4.0),
# as coded by Wojciechowski J et al. AAPS J 2017;19:1136 (in-silico adaptive dosing) and
# used by TDMx. The authors' code clamps ALB to 2-6 g/dL and WT to 35-110 kg: pkmodel
# does not clamp, and warns outside those ranges instead.
XU2012 = PopulationModel(
    name="xu2012",
    structure=Structure(2),
    theta={
        "TVCL": 0.294,  # L/day (Xu 2012 via Wojciechowski 2017)
        "CL_WT": 0.614,
        "CL_ALB": -1.17,
        "CL_ATI": 0.257,
        "TVV1": 3.33,  # L
        "V1_WT": 0.691,
        "TVQ": 0.0719,  # L/day
        "Q_WT": 1.10,
        "TVV2": 1.14,  # L
        "V2_WT": 0.59,
    },
    parameters={
        "CL": _t("TVCL") * _rel(WT, 70) ** _t("CL_WT") * _rel(ALB, 4) ** _t("CL_ALB")
        * (1 + _t("CL_ATI") * ATI) * sp.exp(ETA_CL),
        "V1": _t("TVV1") * _rel(WT, 70) ** _t("V1_WT") * sp.exp(ETA_V1),
        "Q": _t("TVQ") * _rel(WT, 70) ** _t("Q_WT") * sp.exp(ETA_Q),
        "V2": _t("TVV2") * _rel(WT, 70) ** _t("V2_WT") * sp.exp(ETA_V2),
    },
    # IIV variances CL, V1, Q, V2 (Wojciechowski 2017 NONMEM code)
    omega=as_omega([0.106929, 0.0225, 1.21, 0.638401]),
    eta_names=("ETA_CL", "ETA_V1", "ETA_Q", "ETA_V2"),
    residual=ResidualError(proportional=0.419),  # SD; variance 0.175561 (Wojciechowski 2017)
    covariates=(_weight(70.0, observed=(35.0, 110.0)), _albumin_g_dl(4.0, observed=(2.0, 6.0)),
                _ATI),
    citation="Xu/Mould 2012 pooled model, as coded by Wojciechowski et al. AAPS J "
             "2017;19:1136 (NONMEM code of the in-silico adaptive dosing study)",
    description="Pooled children and adults with Crohn's disease (112) and ulcerative "
                "colitis (543), median 70 kg, albumin 4.0 g/dL. The model of the NONMEM "
                "validation set.",
    label=INFLIXIMAB_LABEL,
)

# --------------------------------------------------------------------------------------
# D. Dubinsky et al. AAPS J 2017;19:215, pediatric IBD dashboard, n = 50, mean 41 kg.
DUBINSKY2017 = PopulationModel(
    name="dubinsky2017",
    structure=Structure(2),
    theta={
        "TVCL": 0.296,  # L/day (Dubinsky 2017)
        "CL_WT": 0.612,
        "CL_ALB": -2.3,
        "CL_ATI": 0.231,
        "TVV1": 3.30,  # L
        "V1_WT": 0.696,
        "TVV2": 1.16,  # L
        "V2_WT": 0.604,
        "TVQ": 0.0781,  # L/day
        "Q_WT": 1.15,
    },
    parameters={
        "CL": _t("TVCL") * _rel(WT, 70) ** _t("CL_WT") * _rel(ALB, 4) ** _t("CL_ALB")
        * (1 + _t("CL_ATI") * ATI) * sp.exp(ETA_CL),
        "V1": _t("TVV1") * _rel(WT, 70) ** _t("V1_WT") * sp.exp(ETA_V1),
        "Q": _t("TVQ") * _rel(WT, 70) ** _t("Q_WT") * sp.exp(ETA_Q),
        "V2": _t("TVV2") * _rel(WT, 70) ** _t("V2_WT") * sp.exp(ETA_V2),
    },
    omega=as_omega([0.098, 0.010, 1.232, 0.579]),  # IIV CL, V1, Q, V2 (Dubinsky 2017)
    eta_names=("ETA_CL", "ETA_V1", "ETA_Q", "ETA_V2"),
    residual=ResidualError(proportional=0.419),  # SD (Dubinsky 2017)
    covariates=(_weight(70.0), _albumin_g_dl(4.0), _ATI),
    citation="Dubinsky et al. AAPS J 2017;19:215 (pediatric IBD dosing dashboard)",
    description="Children with inflammatory bowel disease (n = 50, mean 41 kg), built for "
                "a dosing dashboard.",
    label=INFLIXIMAB_LABEL,
)

# --------------------------------------------------------------------------------------
# E. Fasanmade AA et al. Eur J Clin Pharmacol 2009;65:1211, adults with ulcerative
# colitis, n = 482. Reference subject: 77-kg male, ALB 4.1 g/dL.
FASANMADE2009 = PopulationModel(
    name="fasanmade2009",
    structure=Structure(2),
    theta={
        "TVCL": 0.407,  # L/day (Fasanmade 2009)
        "CL_ALB": -1.54,
        "CL_ATI": 0.471,
        "CL_FEMALE": -0.236,
        "TVV1": 3.29,  # L
        "V1_WT": 0.538,
        "V1_FEMALE": -0.137,
        "TVV2": 4.13,  # L
        "TVQ": 7.14,  # L/day
    },
    parameters={
        "CL": _t("TVCL") * _rel(ALB, 4.1) ** _t("CL_ALB") * (1 + _t("CL_ATI") * ATI)
        * (1 + _t("CL_FEMALE") * FEMALE) * sp.exp(ETA_CL),
        "V1": _t("TVV1") * _rel(WT, 77) ** _t("V1_WT") * (1 + _t("V1_FEMALE") * FEMALE)
        * sp.exp(ETA_V1),
        "Q": _t("TVQ"),
        "V2": _t("TVV2"),
    },
    omega=as_omega([0.131, 0.048]),  # IIV variances CL, V1 (Fasanmade 2009)
    eta_names=("ETA_CL", "ETA_V1"),
    residual=ResidualError(proportional=0.403, additive=0.0413),  # SDs (Fasanmade 2009)
    covariates=(_weight(77.0), _albumin_g_dl(4.1), _ATI,
                _indicator("FEMALE", "female sex (1 female)")),
    citation="Fasanmade AA et al. Eur J Clin Pharmacol 2009;65:1211 (ulcerative colitis)",
    description="Adults with ulcerative colitis (ACT 1 and 2, n = 482); reference subject "
                "a 77-kg man with albumin 4.1 g/dL.",
    label=INFLIXIMAB_LABEL,
)

# --------------------------------------------------------------------------------------
# F. Zhao 2026 (Clin Pharmacokinet 65:79), children 10 years or younger, n = 104, median
# 25 kg. ALBUMIN IN g/L. V2 and Q fixed (borrowed). V1 is 3-5 times other models' (sparse
# trough data): a special-purpose model.
ZHAO2026 = PopulationModel(
    name="zhao2026",
    structure=Structure(2),
    theta={
        "TVCL": 0.779,  # L/day (Zhao 2026)
        "CL_ALB": -0.758,
        "CL_CRP": 0.0545,
        "TVV1": 17.2,  # L
        "TVV2": 1.21,  # L, fixed
        "TVQ": 0.0697,  # L/day, fixed
    },
    parameters={
        "CL": _t("TVCL") * _rel(WT, 65) ** sp.Rational(3, 4) * _rel(ALB, 40.5) ** _t("CL_ALB")
        * _rel(CRP, 3) ** _t("CL_CRP") * sp.exp(ETA_CL),
        "V1": _t("TVV1") * _rel(WT, 65),
        "Q": _t("TVQ") * _rel(WT, 65) ** sp.Rational(3, 4),
        "V2": _t("TVV2") * _rel(WT, 65),
    },
    # IIV on CL reported as CV 41.1 %; variance about 0.169 (Zhao 2026, reference file).
    omega=as_omega([0.169]),
    eta_names=("ETA_CL",),
    # Proportional SD is assay-specific, 0.77-0.98 (Zhao 2026); the lower value is used.
    residual=ResidualError(proportional=0.77),
    covariates=(
        _weight(65.0),
        Covariate("ALB", "g/L", "serum albumin", plausible=(10.0, 65.0), reference=40.5,
                  hint="This model expects g/L (healthy 35-50); a value near 3.5 is "
                       "probably g/dL: multiply by 10."),
        Covariate("CRP", "mg/L", "C-reactive protein", plausible=(0.01, 500.0), reference=3.0,
                  hint="CRP in mg/L, above 0 (the equation raises CRP/3 to a power)."),
    ),
    citation="Zhao et al. Clin Pharmacokinet 2026;65:79 (children 10 years or younger)",
    description="Children 10 years or younger (n = 104, median 25 kg), mostly trough data. "
                "Albumin in g/L.",
    label=INFLIXIMAB_LABEL,
)

# --------------------------------------------------------------------------------------
# G. Passot et al. MAbs 2016;8:1407, one compartment; the pediatric factor applies
# below 15 years of age.
PASSOT2016 = PopulationModel(
    name="passot2016",
    structure=Structure(1),
    theta={
        "TVCL": 0.23,  # L/day (Passot 2016)
        "CL_WT": 0.603,
        "CL_MALE": 0.181,
        "CL_CD": 0.384,
        "CL_UC": 0.472,
        "TVV": 5.2,  # L
        "V_WT": 0.277,
        "V_MALE": 0.209,
        "V_CD": 0.399,
        "V_UC": 0.417,
        "V_CHILD": -0.396,
    },
    parameters={
        "CL": _t("TVCL") * _rel(WT, 67) ** _t("CL_WT") * sp.exp(_t("CL_MALE") * MALE
                                                           + _t("CL_CD") * CD
                                                           + _t("CL_UC") * UC + ETA_CL),
        "V1": _t("TVV") * _rel(WT, 67) ** _t("V_WT") * sp.exp(
            _t("V_MALE") * MALE + _t("V_CD") * CD + _t("V_UC") * UC
            + sp.Piecewise((_t("V_CHILD"), AGE < 15), (0, True)) + ETA_V),
    },
    omega=as_omega([0.092, 0.050]),  # IIV variances CL, V (Passot 2016)
    eta_names=("ETA_CL", "ETA_V"),
    residual=ResidualError(proportional=0.223, additive=0.72),  # SDs (Passot 2016)
    covariates=(
        _weight(67.0),
        _indicator("MALE", "male sex (1 male)", reference=None),
        _indicator("CD", "Crohn's disease (1 yes)", reference=None),
        _indicator("UC", "ulcerative colitis (1 yes)", reference=None),
        Covariate("AGE", "year", "age", plausible=(0.0, 120.0), reference=None),
    ),
    citation="Passot et al. MAbs 2016;8:1407 (one compartment, adult and pediatric)",
    description="One-compartment model across inflammatory diseases (adult and pediatric "
                "variants; the pediatric factor on V applies below 15 years).",
    label=INFLIXIMAB_LABEL,
)

MODELS = {
    m.name: m
    for m in (FASANMADE2011, FASANMADE2011_PEDIATRIC, XU2012, DUBINSKY2017, FASANMADE2009,
              ZHAO2026, PASSOT2016)
}
