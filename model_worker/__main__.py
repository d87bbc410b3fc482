from model_worker.main import main

main()
