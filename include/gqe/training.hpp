#pragma once
// gqe's training umbrella header: the objective and its gradient over a model's own layers,
// AdamW with schedules and clipping, initialisation, MQAR and text data, and resumable runs.
#include "gqe/gqe.hpp"
#include "gqe/training/data.hpp"
#include "gqe/training/initialize.hpp"
#include "gqe/training/loss.hpp"
#include "gqe/training/optimizer.hpp"
#include "gqe/training/rng.hpp"
#include "gqe/training/trainer.hpp"
