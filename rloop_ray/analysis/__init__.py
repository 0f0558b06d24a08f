"""Analysis of one sweep: statistics, figures, the report and blind human rating.

A sweep is read only through the store (`load_results` -> `ResultStore.read_sweep`), so
the analysis counts exactly the planned cells, and a damaged or foreign folder is refused
instead of analysed. The modules, each one job:

    load         the sweep as a `ResultSet` (cells, failures, plan, human scores)
    labels       conditions, labels and metric columns of the cells
    estimators   t intervals, d / d_z with exact CIs, bootstrap, Spearman, BH-FDR
    conditions   the per-condition summary (honest n)
    comparisons  which comparisons the design supports, and the two-sample tests
    effects      transfer efficiency, dose-response, R_V vs behaviour, models side by side
    completeness planned vs done, missing conditions, failures by type
    tables       `compute_stats` / `run_stats` (one FDR family) and `write_tables`
    identity     alpha = 0 and `self` cells checked against natural (exact matches)
    profiles     per-layer tables: PR and R_V by depth, attention entropy and masses
    power        the effect a test of the design detects with 80% power
    summary      the answer per model: effects, controls, transfer, verdicts
    examples     generations side by side for a seeded handful of pairs
    notes        the plain-language findings
    figures      the figures (PNG and SVG)
    document, report   the context, its Jinja2 templates (templates/), report.md / .html
    rating       blind rating sheets in, `score_human` out

Methods and the reasons for them: docs/statistics.md.
"""

from rloop_ray.analysis.completeness import Completeness
from rloop_ray.analysis.figures import FigureInfo, make_figures
from rloop_ray.analysis.load import HUMAN_SCORES_FILE, NotLocalError, ResultSet, load_results
from rloop_ray.analysis.notes import Note, derive_notes
from rloop_ray.analysis.rating import RatingFileError, export_for_rating, import_ratings
from rloop_ray.analysis.report import ReportOutputs, write_report
from rloop_ray.analysis.tables import (
    STATS_DIR,
    StatsResult,
    compute_stats,
    run_stats,
    write_tables,
)

__all__ = [
    "HUMAN_SCORES_FILE",
    "STATS_DIR",
    "Completeness",
    "FigureInfo",
    "Note",
    "NotLocalError",
    "RatingFileError",
    "ReportOutputs",
    "ResultSet",
    "StatsResult",
    "compute_stats",
    "derive_notes",
    "export_for_rating",
    "import_ratings",
    "load_results",
    "make_figures",
    "run_stats",
    "write_report",
    "write_tables",
]
