"""How the reference migrator copies a study, by name (`pacs-harness migrate --method`).

move: C-MOVE from the source to the target (PS3.4 C.4.2); get: C-GET into the harness,
then C-STORE to the target (PS3.4 C.4.3); dicomweb: WADO-RS then STOW-RS (PS3.18 10.4,
10.5); orthanc: Orthanc's own peer transfer (REST). Names only: no imports, so the command
line lists them without loading the migrator.
"""

METHODS = ("move", "get", "dicomweb", "orthanc")
