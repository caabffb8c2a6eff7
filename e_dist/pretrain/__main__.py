from e_dist.pretrain.train import main

main()
