#!/usr/bin/env bash
# Tuning rounds of the fmnist_cpu recipe (round*.txt, probe*.txt here): results/run_pairs.sh on Fashion-MNIST.
#   bash results/fmnist_cpu/tune.sh results/fmnist_cpu/round1.txt
OUT=runs/fmnist_tune BASE="--dataset fashion_mnist --data_path /usr/share/datasets/fashion-mnist" \
  exec bash results/run_pairs.sh "$1"
