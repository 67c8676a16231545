"""The web dashboard (`emu dashboard`): runs, curves, samples, lineage, retraining, schedules and
the audit log, served by FastAPI with server-side SVG (emu.dashboard.app)."""
