"""The labs (labs/README.md): each labs/NN-slug/ holds a handout, an instructor's answers, the
lab's checks (lab.py) and known-wrong implementations; `bash labs/check.sh NN` grades one."""
