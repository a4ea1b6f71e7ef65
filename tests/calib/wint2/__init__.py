"""Tests of the offline WINT2 tools (calib/wint2/: writer, GPTQ, tuning)."""
