"""Local multi-process clusters (`kvstore cluster ...`)."""
