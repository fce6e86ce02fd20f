"""Shared test data (no tests here): the test modules import it as ``tests.cases.<module>``.

    models                  the MLP (network output and loss), linear regression, attention loss
    codegen_cases           expressions for generated code (also benchmarks/gpu_check.py)
    evaluate_cases          index-notation cases with torch references
    notation_program_cases  README/gallery programs written a second time, one product a line
    simplify_cases          helpers and pinned closed forms of the simplify/rules/canonical tests
    strategies              hypothesis strategies shared by the convolution tests
    random_programs         the random-program generator of test_random_programs.py
"""
