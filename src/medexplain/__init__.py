"""medexplain: explain image classifiers, medical images first.

Image-wise explainers (``medexplain.explain``), global label-wise maps
(``medexplain.globalmaps``), faithfulness metrics (``medexplain.metrics``) and an
aligned synthetic benchmark with ground truth (``medexplain.data.synthetic``).
"""

__version__ = "0.1.0"
