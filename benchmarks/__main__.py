from .bench_acon import main

main()
