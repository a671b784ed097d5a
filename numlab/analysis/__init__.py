"""Divergence analysis: metrics between runs, attribution of the divergence to op sites, reports and plots."""
