from sdgen.cli import main

main()
