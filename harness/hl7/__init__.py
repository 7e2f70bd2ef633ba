"""HL7 v2 patient updates and merges (issue 17): what a site's ADT feed does to a PACS.

* messages.py      ADT^A08 (update patient information) and ADT^A40 (merge patient, patient
                   identifier list) built with hl7apy (HL7 v2.5 structures ADT_A01 / ADT_A39);
                   the ACK's MSA/ERR read back
* mllp.py          the MLLP client (HL7 v2.5.1 Appendix C, minimal lower layer protocol):
                   one message, one ACK, a deadline on every step and a bounded buffer
* orthanc_apply.py the same change for an Orthanc (no HL7), through its REST API, as a
                   site's integration engine would
* checks.py        what a user checks after each message: C-FIND, a C-GET'd instance read
                   with pydicom, study counts before and after a merge, the late image rule

The embedded PACS's MLLP listener (harness/embedded_pacs/hl7.py) is the reference receiver.
"""
